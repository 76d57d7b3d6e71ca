"""What changed between two trees: moby's ChangesDirs rules, and the size of the changes.

:func:`changes_dirs` walks a layer's tree and its parent's tree side by side, directory by
directory, with the names of each directory sorted, and reports every path that was added,
modified or deleted:

- An entry present on both sides with the same device and inode is the same object (a union
  mount showing a lower file): it and everything below it are unchanged and not walked.
- A name only in the layer is an Add, and so is everything below it.
- A name only in the parent is one Delete; what was below it is not listed.
- A name on both sides is a Modify when :func:`stat_different` says so. A directory whose
  type changed from a non-directory lists its entries as Adds.
- A directory that has any change below it and is not itself an Add gets a Modify, so that a
  diff carries its mode and owner. The root ``/`` is never reported.

What counts as different (:func:`stat_different`): the file type and permission bits, uid, gid
and device number; for non-directories also the size and the mtime (equal when identical, or
when they share the second and either side has no nanoseconds, as a tar without sub-second times
leaves them); the layer xattrs (:mod:`graphdrivers.archive.xattrs`, which include
``security.capability`` and ``user.*``); and a symlink's target. A directory's own mtime and
size are ignored: they change whenever an entry inside is touched, which is reported on its own.

Limitation: an edit that keeps size, mtime and metadata is not seen (nothing reads contents).
Limitation: trees deeper than Python's recursion limit (about 900 levels) cannot be walked.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from graphdrivers.archive.confine import DIR_FLAGS
from graphdrivers.archive.xattrs import read_layer_xattrs

if TYPE_CHECKING:
    from graphdrivers.driver import Change

log = logging.getLogger(__name__)

NS_PER_SECOND = 1_000_000_000


def same_fs_time(a_ns: int, b_ns: int) -> bool:
    """Equal, or the same second with either side lacking nanoseconds."""
    if a_ns == b_ns:
        return True
    a_sec, a_frac = divmod(a_ns, NS_PER_SECOND)
    b_sec, b_frac = divmod(b_ns, NS_PER_SECOND)
    return a_sec == b_sec and (a_frac == 0 or b_frac == 0)


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    """The stat part of the Modify test (see the module docstring)."""
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
    ):
        return True
    if stat.S_ISDIR(new.st_mode):
        return False
    return old.st_size != new.st_size or not same_fs_time(old.st_mtime_ns, new.st_mtime_ns)


class _Walk:
    """One comparison of a layer tree (new) with its parent tree (old)."""

    def __init__(self) -> None:
        from graphdrivers.driver import Change, Kind

        self.change = Change
        self.kind = Kind
        self.changes: list[Change] = []

    def emit(self, path: str, kind: int) -> None:
        self.changes.append(self.change(path, self.kind(kind)))

    def add_tree(self, dir_fd: int, prefix: str) -> None:
        """Report every entry of directory ``dir_fd`` (path ``prefix``) as an Add."""
        add = self.kind.ADD
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                path = f"{prefix}/{entry.name}"
                self.emit(path, add)
                if entry.is_dir(follow_symlinks=False):
                    fd = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
                    try:
                        self.add_tree(fd, path)
                    finally:
                        os.close(fd)

    def compare(self, new_fd: int, old_fd: int, prefix: str) -> bool:
        """Compare two directories' entries; True if anything below changed."""
        new = _listing(new_fd)
        old = _listing(old_fd)
        before = len(self.changes)

        for name in sorted(new):
            path = f"{prefix}/{name}"
            nst = new[name]
            ost = old.pop(name, None)
            if ost is None:
                self.emit(path, self.kind.ADD)
                if stat.S_ISDIR(nst.st_mode):
                    self._descend_add(new_fd, name, path)
                continue
            if ost.st_ino == nst.st_ino and ost.st_dev == nst.st_dev:
                continue
            self._compare_entry(new_fd, old_fd, name, path, nst, ost)

        for name in sorted(old):
            self.emit(f"{prefix}/{name}", self.kind.DELETE)
        return len(self.changes) > before

    def _compare_entry(
        self,
        new_fd: int,
        old_fd: int,
        name: str,
        path: str,
        nst: os.stat_result,
        ost: os.stat_result,
    ) -> None:
        mark = len(self.changes)
        modified = stat_different(ost, nst) or _content_different(new_fd, old_fd, name, nst)
        if modified:
            self.emit(path, self.kind.MODIFY)
        if not stat.S_ISDIR(nst.st_mode):
            return

        if not stat.S_ISDIR(ost.st_mode):
            self._descend_add(new_fd, name, path)
            return
        nfd = os.open(name, DIR_FLAGS, dir_fd=new_fd)
        try:
            ofd = os.open(name, DIR_FLAGS, dir_fd=old_fd)
            try:
                below = self.compare(nfd, ofd, path)
            finally:
                os.close(ofd)
        finally:
            os.close(nfd)
        if below and not modified:
            self.changes.insert(mark, self.change(path, self.kind.MODIFY))

    def _descend_add(self, dir_fd: int, name: str, path: str) -> None:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            self.add_tree(fd, path)
        finally:
            os.close(fd)


def _listing(dir_fd: int) -> dict[str, os.stat_result]:
    with os.scandir(dir_fd) as entries:
        return {e.name: e.stat(follow_symlinks=False) for e in entries}


def _content_different(new_fd: int, old_fd: int, name: str, nst: os.stat_result) -> bool:
    """The non-stat part of the Modify test: symlink target and layer xattrs."""
    if stat.S_ISLNK(nst.st_mode) and (
        os.readlink(name, dir_fd=new_fd) != os.readlink(name, dir_fd=old_fd)
    ):
        return True
    return read_layer_xattrs(new_fd, name) != read_layer_xattrs(old_fd, name)


def changes_dirs(root: Path, parent_root: Path | None) -> list[Change]:
    """The changes of tree ``root`` against ``parent_root`` (None: everything is an Add).

    Paths start with ``/`` and the list is sorted by path. See the module docstring.
    """
    walk = _Walk()
    new_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if parent_root is None:
            walk.add_tree(new_fd, "")
        else:
            old_fd = os.open(parent_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                walk.compare(new_fd, old_fd, "")
            finally:
                os.close(old_fd)
    finally:
        os.close(new_fd)

    walk.changes.sort()
    log.debug("%d changes in %s against %s", len(walk.changes), root, parent_root)
    return walk.changes


def changes_size(root: Path, changes: Sequence[Change]) -> int:
    """Bytes of the regular files added or modified in ``changes``, hardlinks counted once.

    This is what :func:`~graphdrivers.archive.apply_layer` returns for the diff of these
    changes, and what ``Driver.diff_size`` reports.
    """
    from graphdrivers.archive.confine import DirResolver, NotADirectory
    from graphdrivers.driver import Kind

    seen: set[tuple[int, int]] = set()
    total = 0
    with DirResolver(root, follow=False) as resolver:
        for change in changes:
            if change.kind is Kind.DELETE:
                continue
            parts = tuple(p for p in change.path.split("/") if p)
            if not parts:
                continue
            try:
                found = resolver.dir(parts[:-1])
                if found is None:
                    continue
                st = os.stat(parts[-1], dir_fd=found[0], follow_symlinks=False)
            except (FileNotFoundError, NotADirectory):
                continue
            finally:
                resolver.trim()
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
