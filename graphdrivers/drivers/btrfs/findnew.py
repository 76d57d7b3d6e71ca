"""``changes`` of a snapshot against its source in time that grows with the change, not the tree.

The naive comparison (:func:`graphdrivers.archive.changes_dirs`) walks both trees in full: on
btrfs every subvolume has its own device number, so it cannot skip an entry for being "the same
inode" as a union driver can. This module finds the few places worth looking at from btrfs's
generation numbers, the way ``btrfs subvolume find-new`` does, and runs the very same comparison
rules on those places only, so both give the same list.

How. A child layer C is a snapshot of its parent P taken in transaction ``T`` (C's
``otransid``); at that moment both trees are the same blocks. Every later change to an inode
rewrites its ``INODE_ITEM`` (its ctime or size or link count moves), which stamps the item with
the transaction doing it, and copies the leaf holding it into a new block of a newer
generation. So:

1. commit the running transaction (``BTRFS_IOC_SYNC``), so that delayed inode items and
   buffered writes are in the trees;
2. search C's tree with ``min_transid = T + 1``: the kernel skips every tree block not written
   since the snapshot, and of the inode items it returns we keep those whose own ``transid``
   is past ``T``, except those whose only change is the atime (same inode as in the other
   tree, same ctime); the same for P (a parent may have changed after its child was made);
3. turn each such inode into its paths through its ``INODE_REF``/``INODE_EXTREF`` items (one
   per hard link: the directory's inode and the name) and ``BTRFS_IOC_INO_LOOKUP`` for the
   directory's path;
4. compare the two trees along those paths only: a changed directory has its whole listing
   compared (names added or deleted in it), every other directory on the way only the names
   that lead to a changed path. Everything else is unchanged since the snapshot on both sides
   and would give the naive walk nothing to report.

Why this is right: adding, removing or renaming a name changes the directory's inode (mtime,
size), so the directory is found; a changed file, symlink, xattr or owner changes the inode
itself; a rename or a new hard link changes the moved or linked inode (ctime, link count).

Limitations:

- Only for a layer against the subvolume it was snapshotted from, and only when neither holds a
  nested subvolume (the search sees one tree); otherwise :func:`changes_since_snapshot` returns
  None and the caller does the naive walk.
- Reading a layer moves atimes (``relatime``: once after each change), which rewrites inode
  items and so the tree leaves holding them. An inode whose ctime did not move is left out,
  but the search still reads those leaves: after a full read of a layer's directories it
  reads much of the tree (measured in docs/performance.md). A home mounted ``noatime`` avoids
  this.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from graphdrivers.archive.changes import _listing, _Walk
from graphdrivers.drivers.btrfs import ioctl

if TYPE_CHECKING:
    from graphdrivers.driver import Change

log = logging.getLogger(__name__)

BTRFS_INODE_EXTREF_KEY = 13
_INODE_GENERATIONS = struct.Struct("<QQ")  # btrfs_inode_item: generation (created), transid
_CTIME_SLICE = slice(124, 136)  # btrfs_inode_item.ctime: __le64 sec, __le32 nsec (packed)
_INODE_REF = struct.Struct("<QH")  # btrfs_inode_ref: index, name_len; then the name
_INODE_EXTREF = struct.Struct("<QQH")  # btrfs_inode_extref: parent, index, name_len; name


def changed_inodes(fd: int, tree_id: int, since: int) -> dict[int, bytes]:
    """The inode items of tree ``tree_id`` written after transaction ``since``, by inode
    number (tree search with ``min_transid``: only blocks written since are read)."""
    found = {}
    for item in ioctl.tree_search(
        fd,
        tree_id,
        min_key=(ioctl.BTRFS_FIRST_FREE_OBJECTID, ioctl.BTRFS_INODE_ITEM_KEY, 0),
        max_key=(ioctl.BTRFS_LAST_FREE_OBJECTID, ioctl.BTRFS_INODE_ITEM_KEY, ioctl.U64_MAX),
        min_transid=since + 1,
        types=frozenset({ioctl.BTRFS_INODE_ITEM_KEY}),
    ):
        _generation, transid = _INODE_GENERATIONS.unpack_from(item.data)
        if transid > since:
            found[item.objectid] = item.data
    return found


def inode_item(fd: int, tree_id: int, ino: int) -> bytes | None:
    """The raw inode item of ``ino`` in tree ``tree_id`` (None if there is no such inode)."""
    for item in ioctl.tree_search(
        fd,
        tree_id,
        min_key=(ino, ioctl.BTRFS_INODE_ITEM_KEY, 0),
        max_key=(ino, ioctl.BTRFS_INODE_ITEM_KEY, ioctl.U64_MAX),
        types=frozenset({ioctl.BTRFS_INODE_ITEM_KEY}),
    ):
        return item.data
    return None


def only_atime_moved(item: bytes, other: bytes | None, since: int) -> bool:
    """True if ``item`` and ``other`` are the same inode as at the snapshot (same creation
    generation, at most ``since``) and its ctime did not move: every change but an atime
    update moves the ctime, and userspace cannot set it. Reading files in a layer updates
    atimes, which would otherwise make every file read count as changed."""
    if other is None:
        return False
    (generation, _), (other_generation, _) = map(_INODE_GENERATIONS.unpack_from, (item, other))
    return generation == other_generation <= since and item[_CTIME_SLICE] == other[_CTIME_SLICE]


def inode_names(fd: int, tree_id: int, ino: int) -> list[tuple[int, bytes]]:
    """Every (directory inode, name) that links inode ``ino``: its INODE_REF and INODE_EXTREF
    items, which may each pack several names."""
    names = []
    for item in ioctl.tree_search(
        fd,
        tree_id,
        min_key=(ino, ioctl.BTRFS_INODE_REF_KEY, 0),
        max_key=(ino, BTRFS_INODE_EXTREF_KEY, ioctl.U64_MAX),
        types=frozenset({ioctl.BTRFS_INODE_REF_KEY, BTRFS_INODE_EXTREF_KEY}),
    ):
        pos, data = 0, item.data
        while pos < len(data):
            if item.type == ioctl.BTRFS_INODE_REF_KEY:
                _index, length = _INODE_REF.unpack_from(data, pos)
                parent, pos = item.offset, pos + _INODE_REF.size
            else:
                parent, _index, length = _INODE_EXTREF.unpack_from(data, pos)
                pos += _INODE_EXTREF.size
            names.append((parent, data[pos : pos + length]))
            pos += length
    return names


def inode_paths(fd: int, tree_id: int, ino: int) -> list[str]:
    """The paths (``/a/b``; ``""`` for the root) of inode ``ino`` in tree ``tree_id``."""
    if ino == ioctl.BTRFS_FIRST_FREE_OBJECTID:
        return [""]
    paths = []
    for parent, name in inode_names(fd, tree_id, ino):
        if parent == ioctl.BTRFS_FIRST_FREE_OBJECTID:
            where = ""
        else:
            where = "/" + ioctl.ino_lookup(fd, tree_id, parent)[1].rstrip("/")
        paths.append(f"{where}/{os.fsdecode(name)}")
    return paths


class _PrunedWalk(_Walk):
    """The naive comparison's rules, applied along the given changed paths only."""

    def __init__(self, changed: Iterable[str]) -> None:
        super().__init__()
        self.full: set[str] = set()
        self.leads: dict[str, set[str]] = {}
        for path in changed:
            self.full.add(path)
            parts = path.split("/")[1:] if path else []
            for depth, name in enumerate(parts):
                prefix = "".join(f"/{p}" for p in parts[:depth])
                self.leads.setdefault(prefix, set()).add(name)

    def compare(self, new_fd: int, old_fd: int, prefix: str) -> bool:
        """Like the naive compare, but names unchanged on both sides are not looked at."""
        leads = self.leads.get(prefix, set())
        if prefix in self.full:
            new, old = _listing(new_fd), _listing(old_fd)
        else:
            new, old = _stat_names(new_fd, leads), _stat_names(old_fd, leads)
        before = len(self.changes)

        for name in sorted(new):
            path = f"{prefix}/{name}"
            nst = new[name]
            ost = old.pop(name, None)
            if ost is None:
                self.emit(path, self.kind.ADD)
                if stat.S_ISDIR(nst.st_mode):
                    self._descend_add(new_fd, name, path)
            elif name in leads:
                self._compare_entry(new_fd, old_fd, name, path, nst, ost)

        for name in sorted(old):
            self.emit(f"{prefix}/{name}", self.kind.DELETE)
        return len(self.changes) > before


def _stat_names(dir_fd: int, names: Iterable[str]) -> dict[str, os.stat_result]:
    out = {}
    for name in names:
        try:
            out[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out


def changes_since_snapshot(root: Path, parent_root: Path) -> list[Change] | None:
    """The changes of subvolume ``root`` against ``parent_root``, or None where this method
    does not apply (see the module docstring); the same list the naive walk gives."""
    new_fd = ioctl.open_dir(root)
    try:
        old_fd = ioctl.open_dir(parent_root)
        try:
            return _changes(new_fd, old_fd)
        finally:
            os.close(old_fd)
    finally:
        os.close(new_fd)


def changed_paths(new_fd: int, old_fd: int, since: int) -> set[str]:
    """Paths, in either subvolume, of the inodes changed since transaction ``since`` (after a
    commit, so that the trees hold every change made so far)."""
    ioctl.sync(new_fd)
    new_tree, old_tree = ioctl.subvolume_id(new_fd), ioctl.subvolume_id(old_fd)
    changed: set[str] = set()
    sides = ((new_fd, new_tree, old_fd, old_tree), (old_fd, old_tree, new_fd, new_tree))
    for fd, tree, other_fd, other_tree in sides:
        for ino, item in changed_inodes(fd, tree, since).items():
            if not only_atime_moved(item, inode_item(other_fd, other_tree, ino), since):
                changed.update(inode_paths(fd, tree, ino))
    return changed


def _changes(new_fd: int, old_fd: int) -> list[Change] | None:
    new, old = ioctl.subvolume_info(new_fd), ioctl.subvolume_info(old_fd)
    if new.parent_uuid != old.uuid:
        return None
    if ioctl.child_subvolumes(new_fd, new.id) or ioctl.child_subvolumes(old_fd, old.id):
        return None

    since = new.otransid
    changed = changed_paths(new_fd, old_fd, since)
    walk = _PrunedWalk(changed)
    walk.compare(new_fd, old_fd, "")
    walk.changes.sort()
    log.debug(
        "%d changed paths since transaction %d gave %d changes",
        len(changed),
        since,
        len(walk.changes),
    )
    return walk.changes
