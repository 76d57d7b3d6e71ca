"""Copy-up: making a lower entry writable by copying it into the upper directory.

Every copy is built in the work dir and renamed into the upper when complete, so the upper never
holds half a file. The copy keeps mode (set after owner, so setuid survives), owner, ns times,
xattrs (``security.capability`` too), sparse holes (``SEEK_DATA``/``SEEK_HOLE`` with
``copy_file_range``) and records the origin xattr (:mod:`fusemount.inodes`) so its inode number
does not change. Parent directories are copied first, with their attributes; the times of the
upper parent are put back after the rename, as kernel overlayfs does.

Hardlinks: a lower file with ``st_nlink > 1`` is copied once and every other visible name of it
is linked to the copy in the upper, so all names stay one inode (kernel overlayfs without
``index=on`` splits them). The other names come from a per-layer index of multiply linked files,
built the first time it is needed (read-only layers never change).

# Limitation: the hardlink index walks the whole lower layer once (about 10 ms per 1,000
# entries); a hardlinked name that a higher layer hides is not linked (it is not visible).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator

from fusemount import xattrs
from fusemount.inodes import Node, encode_origin
from fusemount.layers import DIR_OPEN_FLAGS, Layer
from fusemount.tree import UnionTree, origin_xattr_for, proc_path
from fusemount.whiteouts import WhiteoutWriter

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 24
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@contextlib.contextmanager
def kept_times(dir_fd: int) -> Iterator[None]:
    """Restore a directory's atime/mtime after adding an entry that is not a user change."""
    st = os.stat(dir_fd)
    yield
    os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy file contents, leaving holes where the source has holes."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src_fd, offset, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(src_fd, data, SEEK_HOLE)
        _copy_range(src_fd, dst_fd, data, hole - data)
        offset = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, min(count, COPY_CHUNK), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src_fd, min(count, 1 << 20), offset)
            done = os.pwrite(dst_fd, chunk, offset) if chunk else 0
        if done == 0:
            return
        offset += done
        count -= done


class HardlinkIndex:
    """For each read-only layer, the paths of its multiply linked files, by ``st_ino``."""

    def __init__(self) -> None:
        self._by_layer: dict[int, dict[int, list[tuple[bytes, ...]]]] = {}

    def names(self, layer: Layer, st_ino: int) -> list[tuple[bytes, ...]]:
        index = self._by_layer.get(layer.pos)
        if index is None:
            index = self._by_layer[layer.pos] = {}
            self._walk(layer.root_fd, (), index)
        return index.get(st_ino, [])

    def _walk(
        self, dir_fd: int, prefix: tuple[bytes, ...], out: dict[int, list[tuple[bytes, ...]]]
    ) -> None:
        for entry in os.scandir(dir_fd):
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                sub = os.open(name, DIR_OPEN_FLAGS, dir_fd=dir_fd)
                try:
                    self._walk(sub, (*prefix, name), out)
                finally:
                    os.close(sub)
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_nlink > 1:
                out.setdefault(st.st_ino, []).append((*prefix, name))


class CopyUp:
    """Copies nodes of a tree into its upper layer."""

    def __init__(self, tree: UnionTree, whiteouts: WhiteoutWriter) -> None:
        assert tree.upper is not None
        self.tree = tree
        self.upper: Layer = tree.upper
        self.work_fd = tree.stack.work_fd
        self.whiteouts = whiteouts
        self.hardlinks = HardlinkIndex()

    def dir_fd(self, node: Node) -> int:
        """The upper fd of a directory node, copying it (and its parents) up first."""
        if node.chain[0] is not self.upper:
            self._copy_dir(node)
        return self.tree.table.dir_fd(node, self.upper)

    def _copy_dir(self, node: Node) -> None:
        assert node.parent is not None
        parent_fd = self.dir_fd(node.parent)
        src_fd = self.tree.table.dir_fd(node, node.layer)
        st = os.stat(src_fd)
        tmp = self.whiteouts.temp_name()
        os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
        fd = os.open(tmp, DIR_OPEN_FLAGS, dir_fd=self.work_fd)
        try:
            xattrs.copy_all(src_fd, True, fd, True)
            os.setxattr(fd, origin_xattr_for(stat.S_IFDIR), encode_origin(node.ino))
            os.chown(fd, st.st_uid, st.st_gid)
            os.chmod(fd, stat.S_IMODE(st.st_mode))
            with kept_times(parent_fd):
                os.rename(tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=parent_fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            os.close(fd)
            raise
        node.chain.insert(0, self.upper)
        node.layer = self.upper
        self.tree.table.fds.put((node.ino, self.upper.pos), fd)
        log.debug("copied up directory %r", node)

    def node(self, node: Node) -> None:
        """Copy a non-directory up (with every visible name of a hardlinked file)."""
        if node.layer is self.upper:
            return
        if node.is_dir:
            self.dir_fd(node)
            return
        st = self.tree.stat(node)
        if node.pin_fd >= 0:
            self._copy_unlinked(node, st)
            return
        lower = node.layer
        parent = node.parent
        assert parent is not None
        parent_fd = self.dir_fd(parent)
        tmp = self.build(node, st)
        with kept_times(parent_fd):
            os.rename(tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=parent_fd)
        node.layer = self.upper
        node.generation += 1
        if st.st_nlink > 1:
            with self.tree.table.held(node):
                self._link_other_names(node, lower, st)
        log.debug("copied up %r", node)

    def _copy_unlinked(self, node: Node, st: os.stat_result) -> None:
        """An open file whose last name went away: its copy lives nameless, held by fd."""
        tmp = self.build(node, st)
        pin = os.open(tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.work_fd)
        os.unlink(tmp, dir_fd=self.work_fd)
        os.close(node.pin_fd)
        node.pin_fd = pin
        node.layer = self.upper
        node.generation += 1

    def build(self, node: Node, st: os.stat_result) -> bytes:
        """A copy of the node's entry in the work dir, with all its attributes; its name."""
        src = self.tree.node_path(node)
        follow = self.tree.follow_path(node)
        tmp = self.whiteouts.temp_name()
        work = self.work_fd
        try:
            if stat.S_ISREG(st.st_mode):
                self._build_file(src, follow, tmp, st, node.ino)
            else:
                if stat.S_ISLNK(st.st_mode):
                    if node.pin_fd >= 0:
                        target = os.readlink(b"", dir_fd=node.pin_fd)
                    else:
                        target = os.readlink(src)
                    os.symlink(target, tmp, dir_fd=work)
                else:
                    os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work)
                dst = proc_path(work, tmp)
                os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(dst, stat.S_IMODE(st.st_mode))
                xattrs.copy_all(src, follow, dst, False)
                self._set_origin(dst, st.st_mode, node.ino)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=work)
            raise
        return tmp

    def _build_file(
        self, src: bytes, follow: bool, tmp: bytes, st: os.stat_result, ino: int
    ) -> None:
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        src_fd = os.open(src, flags)
        try:
            dst_fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
                dir_fd=self.work_fd,
            )
            try:
                copy_data(src_fd, dst_fd, st.st_size)
                os.fchown(dst_fd, st.st_uid, st.st_gid)
                os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
                xattrs.copy_all(src, follow, dst_fd, True)
                os.setxattr(dst_fd, origin_xattr_for(st.st_mode), encode_origin(ino))
                os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    @staticmethod
    def _set_origin(path: bytes, mode: int, ino: int) -> None:
        try:
            os.setxattr(path, origin_xattr_for(mode), encode_origin(ino), follow_symlinks=False)
        except OSError as exc:
            # Limitation: without trusted.* (not root) a copied-up special file gets a new
            # inode number on its next lookup.
            log.debug("origin xattr not recorded on a special file: %s", exc)

    def _link_other_names(self, node: Node, lower: Layer, st: os.stat_result) -> None:
        """Give the copy every other name the lower file has in the merged view."""
        assert node.parent is not None
        src_fd = self.tree.table.dir_fd(node.parent, self.upper)
        for path in self.hardlinks.names(lower, st.st_ino):
            parent = self._resolve_parent(path)
            if parent is None:
                continue
            name = path[-1]
            other = self.tree.lookup(parent, name)
            if other is node and (parent, name) != (node.parent, node.name):
                if parent.chain[0] is self.upper and _exists(
                    self.tree.table.dir_fd(parent, self.upper), name
                ):
                    continue
                dst_fd = self.dir_fd(parent)
                with kept_times(dst_fd):
                    os.link(
                        node.name,
                        name,
                        src_dir_fd=src_fd,
                        dst_dir_fd=dst_fd,
                        follow_symlinks=False,
                    )
            self.tree.table.prune(parent)

    def _resolve_parent(self, path: tuple[bytes, ...]) -> Node | None:
        """The directory node holding ``path`` in the merged view (internal, 0 lookups)."""
        node = self.tree.root
        for name in path[:-1]:
            child = self.tree.lookup(node, name)
            if child is None or not child.is_dir:
                if child is not None:
                    self.tree.table.prune(child)
                self.tree.table.prune(node)
                return None
            node = child
        return node


def _exists(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
