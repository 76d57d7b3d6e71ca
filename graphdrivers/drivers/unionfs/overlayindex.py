"""Kernel overlayfs with ``index=on``: a copied-up hardlink group stays whole in ``diff/``.

Without the inode index, overlayfs copies up only the name that was written to; the other
names of a lower hardlink group keep the old data (the group splits). With ``index=on`` the
kernel copies the inode up once, into the index directory ``work/index/``, links the written
name to it, and shows every other name of the group through that index entry: the mount is
right, but ``diff/`` holds only the names that were touched::

    lower:   a ─┐ (one inode)        upper diff/:  a ──┐ (the new inode)
             b ─┘                    work/index/<origin file handle> ┘
                                     (b is shown from the index, and missing in diff/)

``diff/`` is the layer: its children mount it as a lower (without that index) and the native
diff reads it, so ``b`` must be in it too. Before the driver unmounts a writable layer whose
index is not empty, :func:`link_up_aliases` finds, through the mount, every visible name of an
indexed group that ``diff/`` lacks, and asks the kernel to copy it up (a ``utime`` to the
times it already has): the kernel links it to the index entry, which keeps the group one inode.
After the unmount :func:`clear_index` empties ``work/index/``; the kernel needs no entry for a
group whose names are all in the upper dir, and the next mount starts an index afresh.

Merged inode numbers make the search cheap: with every layer on one filesystem and the index
on, a copied-up file keeps its lower inode number in the mount, so a group's names are the
merged non-directories with that ``st_ino`` and ``st_nlink > 1``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from graphdrivers.fsutil.remove import remove_tree

log = logging.getLogger(__name__)

INDEX_DIR = "index"


def indexed_inodes(work: Path) -> set[int]:
    """Upper inode numbers of the index entries in ``work/index/`` (its whiteouts skipped)."""
    index = work / INDEX_DIR
    try:
        entries = list(os.scandir(index))
    except FileNotFoundError:
        return set()
    found = set()
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISCHR(st.st_mode):
            found.add(st.st_ino)
    return found


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root``, without following symlinks."""
    with os.scandir(root / rel if rel else root) as it:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    for name, st in entries:
        path = f"{rel}/{name}" if rel else name
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, path)


def link_up_aliases(merged: Path, upper: Path, work: Path) -> int:
    """Make the kernel link every visible name of an indexed group into ``upper``.

    ``merged`` is the live writable mount of ``upper``. Returns how many names were linked up.
    """
    indexed = indexed_inodes(work)
    if not indexed:
        return 0
    groups = {  # merged inode numbers of the indexed groups
        os.lstat(merged / path).st_ino
        for path, st in _walk(upper)
        if st.st_ino in indexed and not stat.S_ISDIR(st.st_mode)
    }
    linked = 0
    for path, st in list(_walk(merged)):
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2 or st.st_ino not in groups:
            continue
        if os.path.lexists(upper / path):
            continue
        os.utime(merged / path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        linked += 1
        log.debug("linked up /%s, a name of an indexed hardlink group", path)
    return linked


def clear_index(work: Path) -> None:
    """Empty ``work/index/`` of an unmounted layer (entries for groups now whole in diff/)."""
    index = work / INDEX_DIR
    try:
        names = os.listdir(index)
    except FileNotFoundError:
        return
    for name in names:
        remove_tree(index / name)
