"""Renaming a directory that has lower layers: a full copy into the upper, then a whiteout.

Kernel overlayfs answers ``EXDEV`` here unless ``redirect_dir`` is on (and then the upper holds a
redirect xattr a layer tar cannot express); fuse-overlayfs copies. We copy too, so the upper
stays a plain directory tree any overlay implementation reads the same way:

1. build the merged subtree in the work dir: directories made fresh with their attributes and
   origin xattr (the top one opaque when a lower layer has an entry at the new name);
   upper files hardlinked into it (same inode), lower files copied with their attributes,
   hardlinked lower files copied up once in place and then linked, so link groups survive;
2. rename the finished copy onto the new name (clearing a whiteout or a merged-empty
   directory there);
3. replace the old name by a whiteout (the old upper directory, if any, goes with it).

Inode numbers do not change: every copy carries its origin (:mod:`fusemount.inodes`); nodes the
kernel holds are re-resolved in place.

# Limitation: the copy costs time and space proportional to the subtree, and is not atomic: a
# crash during step 1 leaves only work-dir debris (cleared at the next mount), between 2 and 3
# both names show the directory.
"""

from __future__ import annotations

import logging
import os
import stat

from fusemount import layers as ly
from fusemount import xattrs
from fusemount.copyup import CopyUp
from fusemount.inodes import Node, encode_origin
from fusemount.tree import UnionTree, origin_xattr_for
from fusemount.whiteouts import WhiteoutWriter, remove_entry

log = logging.getLogger(__name__)


class RenameDir:
    """One rename of a merged directory (see the module docstring)."""

    def __init__(self, tree: UnionTree, copyup: CopyUp, whiteouts: WhiteoutWriter) -> None:
        self.tree = tree
        self.copyup = copyup
        self.whiteouts = whiteouts
        self.work_fd = tree.stack.work_fd

    def run(
        self,
        old_parent: Node,
        name_old: bytes,
        src: Node,
        new_parent: Node,
        name_new: bytes,
        dst: Node | None,
    ) -> None:
        with self.tree.table.held(src):
            self._run(old_parent, name_old, src, new_parent, name_new, dst)

    def _run(
        self,
        old_parent: Node,
        name_old: bytes,
        src: Node,
        new_parent: Node,
        name_new: bytes,
        dst: Node | None,
    ) -> None:
        upper = self.copyup.upper
        old_fd = self.copyup.dir_fd(old_parent)
        tmp = self.whiteouts.temp_name()
        try:
            opaque = self.tree.lower_has(new_parent, name_new)
            self._copy_dir(src, self.work_fd, tmp, opaque)
        except BaseException:
            if _exists(self.work_fd, tmp):
                remove_entry(self.work_fd, tmp, True)
            raise
        new_fd = self.copyup.dir_fd(new_parent)
        if dst is not None and dst.chain[0] is upper:
            self.tree.table.forget_fds(dst)
            remove_entry(new_fd, name_new, True)
        self.whiteouts.clear(new_fd, name_new)
        os.rename(tmp, name_new, src_dir_fd=self.work_fd, dst_dir_fd=new_fd)

        if src.chain[0] is upper:
            self.whiteouts.replace(old_fd, name_old, True)
        else:
            self.whiteouts.make(old_fd, name_old)
        table = self.tree.table
        table.unlink(new_parent, name_new)
        old_parent.children.pop(name_old, None)
        src.parent, src.name = new_parent, name_new
        new_parent.children[name_new] = src
        self.tree.refresh(src)
        table.prune(old_parent)
        log.debug("renamed merged directory %r by copying it", src)

    def _copy_dir(
        self, node: Node, dst_parent_fd: int, dst_name: bytes, opaque: bool = False
    ) -> None:
        with self.tree.table.held(node):
            self._copy_dir_held(node, dst_parent_fd, dst_name, opaque)

    def _copy_dir_held(
        self, node: Node, dst_parent_fd: int, dst_name: bytes, opaque: bool
    ) -> None:
        os.mkdir(dst_name, 0o700, dir_fd=dst_parent_fd)
        fd = os.open(dst_name, ly.DIR_OPEN_FLAGS, dir_fd=dst_parent_fd)
        try:
            for name, hint in self.tree.listing(node):
                child = self.tree.lookup(node, name, hint)
                if child is None:
                    continue
                try:
                    if child.is_dir:
                        self._copy_dir(child, fd, name)
                    else:
                        self._copy_file(child, fd, name)
                finally:
                    self.tree.table.prune(child)
            src_fd = self.tree.table.dir_fd(node, node.layer)
            st = os.stat(src_fd)
            xattrs.copy_all(src_fd, True, fd, True)
            os.setxattr(fd, origin_xattr_for(stat.S_IFDIR), encode_origin(node.ino))
            if opaque:
                self.whiteouts.mark_opaque(fd)
            os.chown(fd, st.st_uid, st.st_gid)
            os.chmod(fd, stat.S_IMODE(st.st_mode))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)

    def _copy_file(self, child: Node, dst_fd: int, name: bytes) -> None:
        upper = self.copyup.upper
        st = self.tree.stat(child)
        if child.layer is not upper and st.st_nlink > 1:
            self.copyup.node(child)
        if child.layer is upper:
            os.link(
                child.name,
                name,
                src_dir_fd=self.tree.parent_fd(child),
                dst_dir_fd=dst_fd,
                follow_symlinks=False,
            )
            return
        tmp = self.copyup.build(child, st)
        os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=dst_fd)


def _exists(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
