"""Handlers that change a file in place: write, setattr (truncate, chmod, chown, utimens) and
xattr changes. Each copies the node up first; the change then lands in the upper copy."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3

from fusemount import xattrs
from fusemount.inodes import Node
from fusemount.ops_base import UnionBase, fuse_error

log = logging.getLogger(__name__)


class WriteOps(UnionBase):
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write, leaving the backing file's times alone under the writeback cache.

        With the writeback cache the kernel owns a file's mtime: it stamps it at write(2)
        and sends it later in a SETATTR. Page write-back is queued behind that SETATTR and
        may reach us after it, so a WRITE that let the backing fs stamp its own mtime would
        overwrite the one the kernel showed (a file read back after remount would differ).
        """
        fd = self.file_handle(fh).fd
        if not self.enable_writeback_cache:
            return os.pwrite(fd, buf, off)
        before = os.fstat(fd)
        written = os.pwrite(fd, buf, off)
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        return written

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.node(inode)
        changes = (
            fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid
        )
        if not (changes or fields.update_atime or fields.update_mtime):
            return self.attrs(node)  # ctime only: the backing fs keeps its own
        self.writable().node(node)
        if fields.update_size:
            self._truncate(node, attr.st_size, fh)
        path = self.tree.node_path(node)
        follow = self.tree.follow_path(node)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid, follow_symlinks=follow)
        if fields.update_mode:
            if self.is_symlink(self.tree.stat(node)):
                raise fuse_error(errno.EOPNOTSUPP)
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            current = self.tree.stat(node)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
        return self.attrs(node)

    def _truncate(self, node: Node, size: int, fh: int | None) -> None:
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        if fh is not None and fh in self.handles.files:
            os.ftruncate(self.file_handle(fh).fd, size)
            return
        fd = self.tree.open_backing(node, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self.node(inode)
        key = os.fsdecode(name)
        if xattrs.is_hidden(key):
            raise fuse_error(errno.EPERM)
        self.writable().node(node)
        path = self.tree.node_path(node)
        os.setxattr(path, key, value, follow_symlinks=self.tree.follow_path(node))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.node(inode)
        key = os.fsdecode(name)
        if xattrs.is_hidden(key):
            raise fuse_error(pyfuse3.ENOATTR)
        self.writable().node(node)
        path = self.tree.node_path(node)
        os.removexattr(path, key, follow_symlinks=self.tree.follow_path(node))
