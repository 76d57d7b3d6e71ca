"""Handlers that read: lookup, forget, getattr, readlink, open/read/release, xattr reads,
statfs, and the directory listing (opendir/readdir with readdirplus attributes)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

import pyfuse3

from fusemount import xattrs
from fusemount.handles import DirHandle, FileHandle
from fusemount.ops_base import UnionBase, fuse_error
from fusemount.tree import NAME_MAX

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
NOT_REOPENED = os.O_CREAT | os.O_EXCL | os.O_NOCTTY


class ReadOps(UnionBase):
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_inode)
        if name == b".":
            return self.entry(parent)
        if name == b"..":
            return self.entry(parent.parent or parent)
        if len(name) > NAME_MAX:
            raise fuse_error(errno.ENAMETOOLONG)
        node = self.tree.lookup(parent, name)
        if node is None:
            return self.negative_entry()
        return self.entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        table = self.tree.table
        for ino, count in inode_list:
            node = table.get(ino)
            if node is None:
                continue
            node.lookups = max(0, node.lookups - count)
            if not node.lookups:
                table.prune(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.node(inode)
        if node.is_dir:
            raise fuse_error(errno.EINVAL)
        if node.pin_fd >= 0:
            return os.readlink(b"", dir_fd=node.pin_fd)
        return os.readlink(node.name, dir_fd=self.tree.parent_fd(node))

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.node(inode)
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        if flags & WRITE_FLAGS:
            self.writable().node(node)
        flags &= ~NOT_REOPENED
        if self.enable_writeback_cache:
            # The kernel reads pages of write-only files and tracks O_APPEND offsets itself.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        fd = self.tree.open_backing(node, flags)
        fh = self.handles.add_file(FileHandle(node, fd, flags & ~os.O_TRUNC, node.generation))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.file_handle(fh).fd, size, off)

    async def flush(self, fh: int) -> None:
        # Nothing to do on close(); ENOSYS makes the kernel stop sending FLUSH.
        raise fuse_error(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        handle = self.handles.files.pop(fh, None)
        if handle is None:
            return
        os.close(handle.fd)
        handle.node.opens -= 1
        self.tree.table.prune(handle.node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.file_handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.tree.stack.layers[0].root_fd)
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = NAME_MAX
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.node(inode)
        key = os.fsdecode(name)
        if xattrs.is_hidden(key):
            raise fuse_error(pyfuse3.ENOATTR)
        path = self.tree.node_path(node)
        return os.getxattr(path, key, follow_symlinks=self.tree.follow_path(node))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self.node(inode)
        names = xattrs.listed(self.tree.node_path(node), self.tree.follow_path(node))
        return [os.fsencode(name) for name in names]

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Mounted with default_permissions: the kernel checks modes itself.
        self.node(inode)
        return True

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.handles.add_dir(DirHandle(self.dir_node(inode)))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.dirs.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        node = handle.node
        if handle.entries is None or start_id == 0:
            handle.entries = sorted(self.tree.listing(node))
        entries = handle.entries
        for index in range(start_id, len(entries)):
            name, hint = entries[index]
            child = self.tree.lookup(node, name, hint)
            if child is None:
                continue
            attr = self.attrs(child)
            if not self.readdir_reply(token, name, attr, index + 1):
                self.tree.table.prune(child)
                return
            child.lookups += 1

    async def releasedir(self, fh: int) -> None:
        handle = self.handles.dirs.pop(fh, None)
        if handle is not None:
            handle.node.opens -= 1
            self.tree.table.prune(handle.node)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self.handles.dirs.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        node = handle.node
        upper = self.tree.upper
        if upper is not None and node.chain[0] is upper:
            os.fsync(self.tree.table.dir_fd(node, upper))
