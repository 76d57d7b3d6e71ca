"""The merged tree: finding a name through the layers, building nodes, listing directories.

Resolution of ``name`` in a merged directory walks the directory's chain top first:

- a whiteout (char device 0/0, or ``.wh.<name>`` in that layer) ends the walk;
- a non-directory ends it too (it hides everything below; a non-directory *under* a directory
  is simply not part of that directory's chain);
- a directory joins the chain, which stops after the first opaque directory
  (``trusted.overlay.opaque``/``user.overlay.opaque`` = ``y``, or ``.wh..wh..opq`` inside).

Names starting with ``.wh.`` are never visible: they are whiteouts or aufs metadata (and the
stray ``.wh..opq`` devices fuse-overlayfs leaves).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import stat
from collections.abc import Iterable

from fusemount import layers as ly
from fusemount.inodes import (
    ORIGIN_XATTR,
    ORIGIN_XATTR_TRUSTED,
    ROOT_INO,
    Node,
    NodeTable,
    decode_origin,
    make_ino,
)
from fusemount.layers import DIR_OPEN_FLAGS, Found, Layer, LayerStack
from graphdrivers import whiteout as wh

log = logging.getLogger(__name__)

NAME_MAX = 255
INDEX_MIN_LAYERS = 8  # directories with this many read-only layers get a lower index
INDEX_CACHE_DIRS = 256
Candidates = list[tuple[Layer, os.stat_result]]


@dataclasses.dataclass
class TreeConfig:
    """What the options decide about the tree."""

    whiteout: wh.WhiteoutFormat = wh.WhiteoutFormat.OVERLAY
    opaque_xattr: str = wh.OVERLAY_OPAQUE_XATTR
    lower_timeout: float = 86400.0
    upper_timeout: float = 1.0
    negative_timeout: float = 86400.0
    fd_capacity: int = 8192


def origin_xattr_for(mode: int) -> str:
    """``user.*`` xattrs exist only on regular files and directories."""
    return ORIGIN_XATTR if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else ORIGIN_XATTR_TRUSTED


def read_origin(path: bytes | int, mode: int) -> int | None:
    """The origin inode recorded on an entry (path through /proc/self/fd, or a directory fd)."""
    try:
        if isinstance(path, int):
            value = os.getxattr(path, origin_xattr_for(mode))
        else:
            value = os.getxattr(path, origin_xattr_for(mode), follow_symlinks=False)
    except OSError:
        return None
    return decode_origin(value)


def proc_path(dir_fd: int, name: bytes = b"") -> bytes:
    """A short path naming ``name`` in the directory ``dir_fd`` (or the fd's own file)."""
    base = b"/proc/self/fd/%d" % dir_fd
    return base + b"/" + name if name else base


def _maybe_whiteout(entry: os.DirEntry[str]) -> bool:
    """Whether an entry may be a device (d_type says neither dir, file nor symlink)."""
    follow = False
    return not (
        entry.is_dir(follow_symlinks=follow)
        or entry.is_file(follow_symlinks=follow)
        or entry.is_symlink()
    )


def hidden_name(name: bytes) -> bool:
    return name.startswith(b".wh.")


class UnionTree:
    """Layers, nodes and the rules that merge them; the Operations handlers build on this."""

    def __init__(self, stack: LayerStack, config: TreeConfig) -> None:
        self.stack = stack
        self.config = config
        top = stack.layers[0]
        root = Node(ROOT_INO, True, top, None, b"")
        root.chain = self._root_chain()
        self.table = NodeTable(root, config.fd_capacity)
        self._indexes: collections.OrderedDict[tuple[int, tuple[int, ...]], _Merge] = (
            collections.OrderedDict()
        )

    def _root_chain(self) -> list[Layer]:
        chain = []
        for layer in self.stack.layers:
            chain.append(layer)
            if ly.is_opaque(layer.root_fd) and layer is not self.stack.layers[-1]:
                break
        return chain

    @property
    def root(self) -> Node:
        return self.table.root

    @property
    def upper(self) -> Layer | None:
        return self.stack.upper

    # -- finding entries ------------------------------------------------------------------

    def collect(
        self, parent: Node, name: bytes, layers: Iterable[Layer] | None = None
    ) -> Candidates:
        """The entries ``name`` shows through, top first (see the module docstring)."""
        if layers is None:
            index = self._index(parent)
            if index is not None:
                return self._collect_indexed(parent, name, index)
        found: Candidates = []
        for layer in parent.chain if layers is None else layers:
            kind, st = ly.probe(self.table.dir_fd(parent, layer), name)
            if kind is Found.WHITEOUT:
                break
            if kind is Found.ABSENT or st is None:
                continue
            if found and not stat.S_ISDIR(st.st_mode):
                break
            found.append((layer, st))
            if not stat.S_ISDIR(st.st_mode):
                break
        return found

    def _collect_indexed(self, parent: Node, name: bytes, index: _Merge) -> Candidates:
        found: Candidates = []
        top = parent.chain[0]
        if top.writable:
            kind, st = ly.probe(self.table.dir_fd(parent, top), name)
            if kind is Found.WHITEOUT:
                return found
            if kind is Found.ENTRY and st is not None:
                found.append((top, st))
                if not stat.S_ISDIR(st.st_mode):
                    return found
        held = index.entries.get(name)
        if held is None or (found and not held[0]):
            return found
        for layer in held[1]:
            st = os.stat(name, dir_fd=self.table.dir_fd(parent, layer), follow_symlinks=False)
            found.append((layer, st))
        return found

    def lookup(self, parent: Node, name: bytes, hint: list[Layer] | None = None) -> Node | None:
        """The node ``name`` in ``parent`` refers to, or None; the lookup count is unchanged."""
        known = parent.children.get(name)
        if known is not None:
            return known
        if hidden_name(name) or len(name) > NAME_MAX:
            return None
        candidates = self.collect(parent, name, hint)
        if not candidates:
            return None
        node = self._node_from(parent, name, candidates)
        self.table.link(parent, name, node)
        return node

    def _node_from(self, parent: Node, name: bytes, candidates: Candidates) -> Node:
        top_layer, top_st = candidates[0]
        if not stat.S_ISDIR(top_st.st_mode):
            parent_fd = self.table.dir_fd(parent, top_layer)
            origin = read_origin(proc_path(parent_fd, name), top_st.st_mode)
            ino = origin or make_ino(top_layer.number, top_st.st_ino)
            node = self.table.get(ino)
            if node is None:
                node = self.table.add(Node(ino, False, top_layer, None, b""))
            return node

        chain, fds = self._dir_chain(parent, name, candidates)
        origin = read_origin(fds[0], stat.S_IFDIR)
        lowest_layer, lowest_st = candidates[len(chain) - 1]
        ino = origin or make_ino(lowest_layer.number, lowest_st.st_ino)
        node = self.table.get(ino)
        if node is None:
            node = self.table.add(Node(ino, True, top_layer, None, b""))
            node.chain = chain
        for layer, fd in zip(chain, fds, strict=True):
            if self.table.fds.get((ino, layer.pos)) is None:
                self.table.fds.put((ino, layer.pos), fd)
            else:
                os.close(fd)
        return node

    def _dir_chain(
        self, parent: Node, name: bytes, candidates: Candidates
    ) -> tuple[list[Layer], list[int]]:
        chain: list[Layer] = []
        fds: list[int] = []
        try:
            for layer, _st in candidates:
                fd = os.open(name, DIR_OPEN_FLAGS, dir_fd=self.table.dir_fd(parent, layer))
                chain.append(layer)
                fds.append(fd)
                if ly.is_opaque(fd):
                    break
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return chain, fds

    def refresh(self, node: Node) -> None:
        """Re-resolve a known node after the entries under it moved (directory rename)."""
        if node.parent is None:
            return
        parent, name = node.parent, node.name
        candidates = self.collect(parent, name)
        if not candidates:
            return
        self.table.forget_fds(node)
        top_layer, _ = candidates[0]
        node.layer = top_layer
        if node.is_dir:
            chain, fds = self._dir_chain(parent, name, candidates)
            node.chain = chain
            for layer, fd in zip(chain, fds, strict=True):
                self.table.fds.put((node.ino, layer.pos), fd)
            for child in list(node.children.values()):
                self.refresh(child)
        node.generation += 1

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """True when a layer below the upper shows ``name`` (so removing it needs a whiteout)."""
        lowers = [layer for layer in parent.chain if not layer.writable]
        index = self._index(parent)
        if index is not None:
            return name in index.entries
        return bool(lowers) and bool(self.collect(parent, name, lowers))

    def listing(self, node: Node) -> list[tuple[bytes, list[Layer]]]:
        """The visible names of a merged directory, each with the layers that hold it."""
        merge = _Merge()
        index = self._index(node)
        for layer in node.chain:
            if index is not None and not layer.writable:
                merge.add_merged(index)
                break
            merge.add_layer(self.table.dir_fd(node, layer), layer)
        return [(name, layers) for name, (_, layers) in merge.entries.items()]

    def _index(self, node: Node) -> _Merge | None:
        """The merged view of a directory's read-only layers, kept for deep stacks.

        Read-only layers never change, so one scan of each serves every later lookup and
        listing: a name missing from all of them costs no syscall at all, which is what keeps
        a lookup at depth 1,000 as fast as at depth 1."""
        lowers = [layer for layer in node.chain if not layer.writable]
        if len(lowers) < INDEX_MIN_LAYERS:
            return None
        key = (node.ino, tuple(layer.pos for layer in lowers))
        merge = self._indexes.get(key)
        if merge is not None:
            self._indexes.move_to_end(key)
            return merge
        merge = _Merge()
        for layer in lowers:
            merge.add_layer(self.table.dir_fd(node, layer), layer)
        self._indexes[key] = merge
        while len(self._indexes) > INDEX_CACHE_DIRS:
            self._indexes.popitem(last=False)
        return merge

    def is_empty(self, node: Node) -> bool:
        return not self.listing(node)

    # -- reaching a node's backing entry -------------------------------------------------

    def parent_fd(self, node: Node, layer: Layer | None = None) -> int:
        assert node.parent is not None
        return self.table.dir_fd(node.parent, layer or node.layer)

    def node_path(self, node: Node) -> bytes:
        """A short /proc path naming the node's backing entry (lgetxattr, utime, chown...)."""
        if node.is_dir:
            return proc_path(self.table.dir_fd(node, node.layer))
        if node.pin_fd >= 0:
            return proc_path(node.pin_fd)
        return proc_path(self.parent_fd(node), node.name)

    def follow_path(self, node: Node) -> bool:
        """Whether calls on :meth:`node_path` must follow (pinned O_PATH fds and dir fds do)."""
        return node.is_dir or node.pin_fd >= 0

    def stat(self, node: Node) -> os.stat_result:
        if node.is_dir:
            return os.stat(self.table.dir_fd(node, node.layer))
        if node.pin_fd >= 0:
            return os.stat(node.pin_fd)
        return os.stat(node.name, dir_fd=self.parent_fd(node), follow_symlinks=False)

    def open_backing(self, node: Node, flags: int) -> int:
        """A new fd for reading or writing the node's current data."""
        flags |= os.O_CLOEXEC
        if node.pin_fd >= 0:
            return os.open(proc_path(node.pin_fd), flags)
        return os.open(node.name, flags | os.O_NOFOLLOW, dir_fd=self.parent_fd(node))

    def pin(self, node: Node) -> None:
        """Hold the node's file by an O_PATH fd before its last known name goes away."""
        if node.pin_fd < 0 and not node.is_dir:
            node.pin_fd = self.open_backing(node, os.O_PATH)

    def close(self) -> None:
        self.table.close()
        self.stack.close()


class _Merge:
    """Merging layer directories top first: visible names, whether the top entry is a
    directory, and the layers that hold each (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[bool, list[Layer]]] = {}
        self.closed: set[bytes] = set()

    def add_layer(self, fd: int, layer: Layer) -> None:
        aufs_whiteouts = []
        names = set()
        entries, closed = self.entries, self.closed
        for entry in os.scandir(fd):
            name = os.fsencode(entry.name)
            if name.startswith(b".wh."):
                if wh.is_whiteout_name(entry.name):
                    aufs_whiteouts.append(name[4:])
                continue
            names.add(name)
            if name in closed:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if _maybe_whiteout(entry) and wh.is_overlay_whiteout(
                entry.stat(follow_symlinks=False)
            ):
                closed.add(name)
                continue
            held = entries.get(name)
            if held is None:
                entries[name] = (is_dir, [layer])
                if not is_dir:
                    closed.add(name)
            elif is_dir:
                held[1].append(layer)
            else:
                closed.add(name)
        for name in aufs_whiteouts:
            if name not in names:
                closed.add(name)

    def add_merged(self, lower: _Merge) -> None:
        """Put an already merged set of lower layers under what was added so far."""
        for name, (is_dir, layers) in lower.entries.items():
            if name in self.closed:
                continue
            held = self.entries.get(name)
            if held is None:
                self.entries[name] = (is_dir, list(layers))
            elif held[0] and is_dir:
                held[1].extend(layers)
