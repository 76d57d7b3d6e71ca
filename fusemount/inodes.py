"""The inode table: one :class:`Node` per file the kernel knows, and stable inode numbers.

Inode numbers
-------------
A file's inode number is derived from its *origin*: the layer number (counted from the bottom,
see :mod:`fusemount.layers`) and ``st_ino`` of the entry it came from::

    ino = layer_number << ORIGIN_SHIFT | st_ino          (the root directory is always 1)

- a non-directory's origin is its topmost entry; a directory's is the lowest layer of its chain;
- copy-up writes the origin into the copy's xattr ``user.fusemount.origin``
  (``trusted.fusemount.origin`` on symlinks and special files, where ``user.*`` is not allowed)
  as ``b"<layer_number>:<st_ino>"``; an entry carrying it takes that origin instead.

So the number survives copy-up, directory rename (the copies carry the origin) and remount,
and every name of a hardlinked file (one ``st_ino`` in one layer) is one inode. Nothing is
stored besides the xattr.

# Limitation: an ``st_ino`` of 2**48 or more (possible on XFS beyond 1 TiB, never on ext4) is
# folded into 48 bits, so two such files of one layer may share an inode number.

Lookup counts follow pyfuse3's rules: lookup, create, mkdir, mknod, symlink, link and each
readdirplus entry add one; ``forget`` subtracts. A node with no lookups, no open handles and
no known children is dropped, together with its cached directory fds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from fusemount.layers import DIR_OPEN_FLAGS, Layer

log = logging.getLogger(__name__)

ROOT_INO = 1
ORIGIN_SHIFT = 48
ORIGIN_MASK = (1 << ORIGIN_SHIFT) - 1
ORIGIN_XATTR = "user.fusemount.origin"
ORIGIN_XATTR_TRUSTED = "trusted.fusemount.origin"
INTERNAL_XATTR_PREFIXES = ("user.fusemount.", "trusted.fusemount.")


def make_ino(layer_number: int, st_ino: int) -> int:
    """The inode number of a file whose origin is ``st_ino`` in layer ``layer_number``."""
    if st_ino > ORIGIN_MASK:
        st_ino = (st_ino ^ (st_ino >> ORIGIN_SHIFT)) & ORIGIN_MASK
    return (layer_number << ORIGIN_SHIFT) | st_ino


def encode_origin(ino: int) -> bytes:
    return b"%d:%d" % (ino >> ORIGIN_SHIFT, ino & ORIGIN_MASK)


def decode_origin(value: bytes) -> int | None:
    """The inode number recorded by :func:`encode_origin`, or None if the value is malformed."""
    number, sep, st_ino = value.partition(b":")
    if not sep or not number.isdigit() or not st_ino.isdigit():
        return None
    return make_ino(int(number), int(st_ino))


class Node:
    """One inode of the merged tree.

    A directory has a *chain*: the layers holding it, top first, down to the first opaque one.
    A non-directory lives in one layer (``layer``) and is reached as ``name`` in its parent's
    directory in that layer, unless ``pin_fd`` holds an ``O_PATH`` fd to it (kept once a known
    upper file lost its last name, so open-unlinked files keep working).
    """

    __slots__ = (
        "aliases",
        "chain",
        "children",
        "generation",
        "ino",
        "is_dir",
        "layer",
        "lookups",
        "name",
        "opens",
        "parent",
        "pin_fd",
    )

    def __init__(
        self, ino: int, is_dir: bool, layer: Layer, parent: Node | None, name: bytes
    ) -> None:
        self.ino = ino
        self.is_dir = is_dir
        self.layer = layer
        self.parent = parent
        self.name = name
        self.chain: list[Layer] = [layer] if is_dir else []
        self.pin_fd = -1
        self.lookups = 0
        self.opens = 0
        self.generation = 0
        self.children: dict[bytes, Node] = {}
        self.aliases: list[tuple[Node, bytes]] = []

    def __repr__(self) -> str:
        kind = "dir" if self.is_dir else "file"
        return f"<Node {self.ino:#x} {kind} {self.name!r} layer={self.layer.number}>"


class FdCache:
    """Directory fds per (node, layer), least recently used closed past ``capacity``.

    Handlers never await, so one handler runs alone; :meth:`trim` is called between handlers,
    which keeps an fd a handler holds from being closed under it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fds: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()

    def get(self, key: tuple[int, int]) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: tuple[int, int], fd: int) -> None:
        old = self._fds.pop(key, None)
        if old is not None:
            os.close(old)
        self._fds[key] = fd

    def drop(self, ino: int, layers: list[Layer]) -> None:
        for layer in layers:
            fd = self._fds.pop((ino, layer.pos), None)
            if fd is not None:
                os.close(fd)

    def trim(self) -> None:
        while len(self._fds) > self.capacity:
            _, fd = self._fds.popitem(last=False)
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __len__(self) -> int:
        return len(self._fds)


class NodeTable:
    """Nodes by inode number, and the directory fds of their layers."""

    def __init__(self, root: Node, fd_capacity: int) -> None:
        self.root = root
        self.nodes: dict[int, Node] = {ROOT_INO: root}
        self.fds = FdCache(fd_capacity)

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    def dir_fd(self, node: Node, layer: Layer) -> int:
        """An fd of ``node``'s directory in ``layer`` (which must be in its chain)."""
        if node.parent is None:
            return layer.root_fd
        key = (node.ino, layer.pos)
        fd = self.fds.get(key)
        if fd is None:
            parent_fd = self.dir_fd(node.parent, layer)
            fd = os.open(node.name, DIR_OPEN_FLAGS, dir_fd=parent_fd)
            self.fds.put(key, fd)
        return fd

    def forget_fds(self, node: Node, layers: list[Layer] | None = None) -> None:
        """Close cached fds of ``node`` (after its directory moved or was replaced)."""
        self.fds.drop(node.ino, node.chain if layers is None else layers)

    def link(self, parent: Node, name: bytes, node: Node) -> None:
        """Record that ``name`` in ``parent`` refers to ``node``."""
        old = parent.children.get(name)
        if old is node:
            return
        if old is not None:
            self.unlink(parent, name)
        parent.children[name] = node
        if node.parent is None and node is not self.root:
            node.parent, node.name = parent, name
        elif (node.parent, node.name) != (parent, name):
            node.aliases.append((parent, name))

    def unlink(self, parent: Node, name: bytes) -> Node | None:
        """Forget the name ``name`` in ``parent``; the node stays while the kernel knows it."""
        node = parent.children.pop(name, None)
        if node is None:
            return None
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
        else:
            try:
                node.aliases.remove((parent, name))
            except ValueError:
                pass
        self.prune(parent)
        return node

    def prune(self, node: Node) -> None:
        """Drop ``node`` if nothing refers to it any more, then its parents likewise."""
        while node is not self.root and not (node.lookups or node.opens or node.children):
            if self.nodes.get(node.ino) is not node:
                return
            del self.nodes[node.ino]
            if node.is_dir:
                self.forget_fds(node)
            if node.pin_fd >= 0:
                os.close(node.pin_fd)
                node.pin_fd = -1
            parent = node.parent
            for other, name in [(parent, node.name), *node.aliases]:
                if other is not None and other.children.get(name) is node:
                    del other.children[name]
            if parent is None:
                return
            node = parent

    @contextlib.contextmanager
    def held(self, node: Node) -> Iterator[Node]:
        """Keep ``node`` in the table while internal work resolves and prunes around it."""
        node.opens += 1
        try:
            yield node
        finally:
            node.opens -= 1
            self.prune(node)

    def stats(self) -> dict[str, Any]:
        return {"nodes": len(self.nodes), "dir_fds": len(self.fds)}

    def close(self) -> None:
        self.fds.close()
        for node in self.nodes.values():
            if node.pin_fd >= 0:
                os.close(node.pin_fd)
                node.pin_fd = -1
