"""Handlers that change names: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

New entries go into the upper copy of the parent. Where the upper holds a whiteout of the name,
the entry replaces it in one step (built in the work dir, then renamed over the overlay
whiteout, or created before the aufs ``.wh.<name>`` is removed); a directory made over a
whiteout is opaque, so the lower directory of that name stays hidden. Removing a name leaves a
whiteout only when a lower layer still shows it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

import pyfuse3

from fusemount import layers as ly
from fusemount.handles import FileHandle
from fusemount.inodes import Node
from fusemount.ops_base import UnionBase, fuse_error
from fusemount.renames import RenameDir
from fusemount.syscalls import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    renameat2,
)
from fusemount.whiteouts import remove_entry
from graphdrivers.whiteout import WhiteoutFormat

log = logging.getLogger(__name__)

Maker = Callable[[int, bytes], None]


class DirOps(UnionBase):
    # -- new entries ------------------------------------------------------------------------

    def _owner(self, parent_fd: int, ctx: pyfuse3.RequestContext) -> tuple[int, int, bool]:
        """The owner of a new entry, and whether the parent is setgid (BSD group semantics)."""
        pst = os.stat(parent_fd)
        if pst.st_mode & stat.S_ISGID:
            return ctx.uid, pst.st_gid, True
        return ctx.uid, ctx.gid, False

    def _new_entry(
        self,
        parent: Node,
        name: bytes,
        make: Maker,
        *,
        is_dir: bool = False,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
    ) -> Node:
        """Create ``name`` in ``parent`` with ``make(dir_fd, name)`` and return its node."""
        self.check_new_name(name)
        copyup, wout = self.writable(), self.wout()
        if self.tree.lookup(parent, name) is not None:
            raise fuse_error(errno.EEXIST)
        parent_fd = copyup.dir_fd(parent)

        def finish(dir_fd: int, entry: bytes) -> None:
            make(dir_fd, entry)
            if owner is not None:
                os.chown(entry, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)
            if mode is not None:
                os.chmod(entry, mode, dir_fd=dir_fd)

        kind, _ = ly.probe(parent_fd, name)
        if kind is not ly.Found.WHITEOUT:
            finish(parent_fd, name)
        else:
            overlay_whiteout = _is_char_whiteout(parent_fd, name)
            work = self.tree.stack.work_fd
            if overlay_whiteout:
                tmp = wout.temp_name()
                finish(work, tmp)
                if is_dir:
                    self._mark_opaque(work, tmp)
                    renameat2(work, tmp, parent_fd, name, RENAME_EXCHANGE)
                    os.unlink(tmp, dir_fd=work)
                else:
                    os.rename(tmp, name, src_dir_fd=work, dst_dir_fd=parent_fd)
            else:
                finish(parent_fd, name)
                if is_dir:
                    self._mark_opaque(parent_fd, name)
            wout.clear(parent_fd, name)
        node = self.tree.lookup(parent, name)
        if node is None:
            raise fuse_error(errno.EIO)
        return node

    def _mark_opaque(self, dir_fd: int, name: bytes) -> None:
        fd = os.open(name, ly.DIR_OPEN_FLAGS, dir_fd=dir_fd)
        try:
            self.wout().mark_opaque(fd)
        finally:
            os.close(fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.dir_node(parent_inode)
        opened: list[int] = []

        def make(dir_fd: int, entry: bytes) -> None:
            open_flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
            opened.append(os.open(entry, open_flags, 0o600, dir_fd=dir_fd))

        copyup = self.writable()
        uid, gid, _ = self._owner(copyup.dir_fd(parent), ctx)
        try:
            node = self._new_entry(parent, name, make, owner=(uid, gid), mode=stat.S_IMODE(mode))
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        handle = FileHandle(node, opened[0], os.O_RDWR, node.generation)
        fh = self.handles.add_file(handle)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self.entry(node)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_inode)
        uid, gid, setgid = self._owner(self.writable().dir_fd(parent), ctx)
        perm = stat.S_IMODE(mode) | (stat.S_ISGID if setgid else 0)

        def make(dir_fd: int, entry: bytes) -> None:
            os.mkdir(entry, 0o700, dir_fd=dir_fd)

        node = self._new_entry(parent, name, make, is_dir=True, owner=(uid, gid), mode=perm)
        return self.entry(node)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_inode)
        uid, gid, _ = self._owner(self.writable().dir_fd(parent), ctx)

        def make(dir_fd: int, entry: bytes) -> None:
            os.mknod(entry, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=dir_fd)

        node = self._new_entry(parent, name, make, owner=(uid, gid), mode=stat.S_IMODE(mode))
        return self.entry(node)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_inode)
        uid, gid, _ = self._owner(self.writable().dir_fd(parent), ctx)

        def make(dir_fd: int, entry: bytes) -> None:
            os.symlink(target, entry, dir_fd=dir_fd)

        node = self._new_entry(parent, name, make, owner=(uid, gid))
        return self.entry(node)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.node(inode)
        parent = self.dir_node(new_parent_inode)
        if node.is_dir:
            raise fuse_error(errno.EPERM)
        self.writable().node(node)
        if node.pin_fd >= 0:
            raise fuse_error(errno.ENOENT)
        src_fd = self.tree.parent_fd(node)

        def make(dir_fd: int, entry: bytes) -> None:
            os.link(node.name, entry, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)

        linked = self._new_entry(parent, new_name, make)
        return self.entry(linked)

    # -- removing ---------------------------------------------------------------------------

    def _existing(self, parent: Node, name: bytes) -> Node:
        if len(name) > 255:
            raise fuse_error(errno.ENAMETOOLONG)
        node = self.tree.lookup(parent, name)
        if node is None:
            raise fuse_error(errno.ENOENT)
        return node

    def _in_upper(self, parent: Node, name: bytes) -> bool:
        upper = self.tree.upper
        if upper is None or parent.chain[0] is not upper:
            return False
        kind, _ = ly.probe(self.tree.table.dir_fd(parent, upper), name)
        return kind is ly.Found.ENTRY

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.dir_node(parent_inode)
        node = self._existing(parent, name)
        if node.is_dir:
            raise fuse_error(errno.EISDIR)
        copyup, wout = self.writable(), self.wout()
        in_upper = self._in_upper(parent, name)
        needs_whiteout = self.tree.lower_has(parent, name)
        parent_fd = copyup.dir_fd(parent)
        if (node.parent, node.name) == (parent, name) and not node.aliases:
            # Its last known name goes: hold the file itself (open-unlinked files, and the
            # ctime update the kernel sends after an unlink must not bring the name back).
            self.tree.pin(node)
        if in_upper:
            if needs_whiteout:
                wout.replace(parent_fd, name, False)
            else:
                os.unlink(name, dir_fd=parent_fd)
        else:
            wout.make(parent_fd, name)
        self.tree.table.unlink(parent, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.dir_node(parent_inode)
        node = self._existing(parent, name)
        if not node.is_dir:
            raise fuse_error(errno.ENOTDIR)
        if not self.tree.is_empty(node):
            raise fuse_error(errno.ENOTEMPTY)
        copyup, wout = self.writable(), self.wout()
        needs_whiteout = self.tree.lower_has(parent, name)
        parent_fd = copyup.dir_fd(parent)
        self.tree.table.forget_fds(node)
        if self._in_upper(parent, name):
            if needs_whiteout:
                wout.replace(parent_fd, name, True)
            else:
                remove_entry(parent_fd, name, True)
        else:
            wout.make(parent_fd, name)
        self.tree.table.unlink(parent, name)

    # -- rename -----------------------------------------------------------------------------

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self.dir_node(parent_inode_old)
        new_parent = self.dir_node(parent_inode_new)
        self.check_new_name(name_new)
        copyup = self.writable()
        src = self._existing(old_parent, name_old)
        dst = self.tree.lookup(new_parent, name_new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise fuse_error(errno.ENOENT)
            self._exchange(old_parent, name_old, src, new_parent, name_new, dst)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise fuse_error(errno.EEXIST)
            if dst is src:
                return
            if dst.is_dir and not src.is_dir:
                raise fuse_error(errno.EISDIR)
            if src.is_dir and not dst.is_dir:
                raise fuse_error(errno.ENOTDIR)
            if dst.is_dir and not self.tree.is_empty(dst):
                raise fuse_error(errno.ENOTEMPTY)
        if src.is_dir and any(not layer.writable for layer in src.chain):
            RenameDir(self.tree, copyup, self.wout()).run(
                old_parent, name_old, src, new_parent, name_new, dst
            )
            return
        copyup.node(src)
        self._rename_upper(old_parent, name_old, src, new_parent, name_new, dst)

    def _rename_upper(
        self,
        old_parent: Node,
        name_old: bytes,
        src: Node,
        new_parent: Node,
        name_new: bytes,
        dst: Node | None,
    ) -> None:
        """Rename an entry that lives wholly in the upper."""
        copyup, wout = self.writable(), self.wout()
        old_fd = copyup.dir_fd(old_parent)
        new_fd = copyup.dir_fd(new_parent)
        if dst is not None and dst.is_dir:
            if self._in_upper(new_parent, name_new):
                ly.clear_dir(self.tree.table.dir_fd(dst, copyup.upper))
        elif (
            dst is not None
            and (dst.parent, dst.name) == (new_parent, name_new)
            and not dst.aliases
        ):
            # Its last name goes to src: hold the file itself, wherever it lives, or the
            # SETATTR the kernel sends the replaced inode (its ctime) would copy the lower
            # file up over src.
            self.tree.pin(dst)
        if dst is not None:
            self.tree.table.forget_fds(dst)
        if src.is_dir and self.tree.lower_has(new_parent, name_new):
            wout.mark_opaque(self.tree.table.dir_fd(src, copyup.upper))
        if src.is_dir:
            wout.clear(new_fd, name_new)  # a directory cannot be renamed over a char device
        needs_whiteout = self.tree.lower_has(old_parent, name_old)
        overlay = wout.fmt is WhiteoutFormat.OVERLAY
        if needs_whiteout and overlay:
            renameat2(old_fd, name_old, new_fd, name_new, RENAME_WHITEOUT)
        else:
            if needs_whiteout:
                wout.make(old_fd, name_old)
            os.rename(name_old, name_new, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        if not overlay:
            wout.clear(new_fd, name_new)
        self.tree.table.unlink(new_parent, name_new)
        move_name(self, old_parent, name_old, src, new_parent, name_new)

    def _exchange(
        self,
        old_parent: Node,
        name_old: bytes,
        src: Node,
        new_parent: Node,
        name_new: bytes,
        dst: Node,
    ) -> None:
        """RENAME_EXCHANGE: both names stay occupied, so no whiteout changes."""
        copyup, wout = self.writable(), self.wout()
        for node in (src, dst):
            if node.is_dir and any(not layer.writable for layer in node.chain):
                # Limitation: exchanging a directory that has lower layers is refused.
                raise fuse_error(errno.EXDEV)
            copyup.node(node)
        old_fd = copyup.dir_fd(old_parent)
        new_fd = copyup.dir_fd(new_parent)
        renameat2(old_fd, name_old, new_fd, name_new, RENAME_EXCHANGE)
        for node, parent, name in ((src, new_parent, name_new), (dst, old_parent, name_old)):
            if node.is_dir and self.tree.lower_has(parent, name):
                wout.mark_opaque(self.tree.table.dir_fd(node, copyup.upper))
        old_parent.children.pop(name_old, None)
        new_parent.children.pop(name_new, None)
        _retarget(src, old_parent, name_old, new_parent, name_new)
        _retarget(dst, new_parent, name_new, old_parent, name_old)
        new_parent.children[name_new] = src
        old_parent.children[name_old] = dst


def move_name(
    ops: UnionBase,
    old_parent: Node,
    name_old: bytes,
    node: Node,
    new_parent: Node,
    name_new: bytes,
) -> None:
    """Update the table after ``name_old`` became ``name_new`` (same node)."""
    old_parent.children.pop(name_old, None)
    _retarget(node, old_parent, name_old, new_parent, name_new)
    new_parent.children[name_new] = node
    ops.tree.table.prune(old_parent)


def _retarget(
    node: Node, old_parent: Node, name_old: bytes, new_parent: Node, name_new: bytes
) -> None:
    if (node.parent, node.name) == (old_parent, name_old):
        node.parent, node.name = new_parent, name_new
    else:
        node.aliases = [
            (new_parent, name_new) if alias == (old_parent, name_old) else alias
            for alias in node.aliases
        ]


def _is_char_whiteout(dir_fd: int, name: bytes) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
