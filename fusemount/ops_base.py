"""State and helpers every handler group shares: nodes, handles, attributes, permissions."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

import pyfuse3

from fusemount.copyup import CopyUp
from fusemount.handles import FileHandle, HandleTable
from fusemount.inodes import Node
from fusemount.tree import NAME_MAX, UnionTree, hidden_name
from fusemount.whiteouts import WhiteoutWriter

log = logging.getLogger(__name__)

ReplyFn = Callable[[pyfuse3.ReaddirToken, bytes, pyfuse3.EntryAttributes, int], bool]


def fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class UnionBase(pyfuse3.Operations):
    """The union's Operations state; handler groups are mixins over it (see ``ops.py``)."""

    supports_dot_lookup = True

    def __init__(self, tree: UnionTree, *, writeback: bool = True) -> None:
        super().__init__()
        self.tree = tree
        self.handles = HandleTable()
        self.whiteouts: WhiteoutWriter | None = None
        self.copyup: CopyUp | None = None
        if tree.upper is not None:
            self.whiteouts = WhiteoutWriter(
                tree.config.whiteout, tree.config.opaque_xattr, tree.stack.work_fd
            )
            self.copyup = CopyUp(tree, self.whiteouts)
        self.enable_writeback_cache = writeback and tree.upper is not None
        # The in-process tests replace this with a collector; a mount uses pyfuse3's.
        self.readdir_reply: ReplyFn = pyfuse3.readdir_reply

    def after_request(self) -> None:
        self.tree.table.fds.trim()

    def close(self) -> None:
        self.handles.close()
        self.tree.close()

    # -- nodes and attributes ---------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.tree.table.get(ino)
        if node is None:
            raise fuse_error(errno.ENOENT)
        return node

    def dir_node(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise fuse_error(errno.ENOTDIR)
        return node

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        st = self.tree.stat(node)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.st_mode = st.st_mode
        merged = node.is_dir and len(node.chain) > 1
        attr.st_nlink = 1 if merged else st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        config = self.tree.config
        timeout = config.upper_timeout if node.layer.writable else config.lower_timeout
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        return attr

    def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference (lookup count + 1)."""
        try:
            attr = self.attrs(node)
        except OSError:
            self.tree.table.prune(node)
            raise
        node.lookups += 1
        return attr

    def negative_entry(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = self.tree.config.negative_timeout
        return attr

    # -- writing ----------------------------------------------------------------------------

    def writable(self) -> CopyUp:
        if self.copyup is None:
            raise fuse_error(errno.EROFS)
        return self.copyup

    def wout(self) -> WhiteoutWriter:
        if self.whiteouts is None:
            raise fuse_error(errno.EROFS)
        return self.whiteouts

    @staticmethod
    def check_new_name(name: bytes) -> None:
        """Names a new entry may not have: too long, or reserved for whiteouts and metadata."""
        if len(name) > NAME_MAX:
            raise fuse_error(errno.ENAMETOOLONG)
        if hidden_name(name) or name in (b".", b"..") or b"/" in name:
            raise fuse_error(errno.EINVAL)

    def file_handle(self, fh: int) -> FileHandle:
        """The open file ``fh``, reopened on the node's current backing file if it changed."""
        handle = self.handles.files.get(fh)
        if handle is None:
            raise fuse_error(errno.EBADF)
        node = handle.node
        if handle.generation != node.generation:
            fd = self.tree.open_backing(node, handle.flags & ~(os.O_TRUNC | os.O_CREAT))
            os.close(handle.fd)
            handle.fd = fd
            handle.generation = node.generation
        return handle

    @staticmethod
    def is_symlink(st: os.stat_result) -> bool:
        return stat.S_ISLNK(st.st_mode)
