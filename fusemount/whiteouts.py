"""Writing whiteouts and opaque markers into the upper directory, in the format the mount uses.

Both formats are always *read* (:mod:`fusemount.layers`); new deletions are *written* in one:

- ``overlay``: a character device 0/0 named like the deleted entry, and the opaque xattr
  (``trusted.overlay.opaque`` or, with ``xattr_namespace=user``, ``user.overlay.opaque``) set to
  ``y``. Kernel overlayfs accepts such an upper dir as is. Needs CAP_MKNOD.
- ``aufs``: an empty file ``.wh.<name>`` beside the deleted entry and an empty ``.wh..wh..opq``
  inside an opaque directory (the OCI layer tar format). Needs no privilege.

Replacing an upper entry by a whiteout is done so that a crash leaves either the old entry or
the whiteout: overlay format renames a ready whiteout over the entry (``RENAME_EXCHANGE`` for a
directory), aufs format writes ``.wh.<name>`` before removing the entry (a whiteout never hides
an entry of its own layer).
"""

from __future__ import annotations

import itertools
import logging
import os
import stat

from fusemount import layers as ly
from fusemount.syscalls import RENAME_EXCHANGE, renameat2
from graphdrivers import whiteout as wh

log = logging.getLogger(__name__)

AUFS_WHITEOUT_MODE = 0o444


class WhiteoutWriter:
    """Makes and removes deletion markers in upper directories, through the work dir."""

    _serial = itertools.count(1)

    def __init__(self, fmt: wh.WhiteoutFormat, opaque_xattr: str, work_fd: int) -> None:
        self.fmt = fmt
        self.opaque_xattr = opaque_xattr
        self.work_fd = work_fd

    def temp_name(self) -> bytes:
        """A fresh name in the work dir."""
        return b"#%d-%d" % (os.getpid(), next(self._serial))

    def make(self, dir_fd: int, name: bytes) -> None:
        """Hide ``name`` (absent from this upper directory) from the layers below."""
        if self.fmt is wh.WhiteoutFormat.OVERLAY:
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=dir_fd)
        else:
            fd = os.open(
                b".wh." + name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444, dir_fd=dir_fd
            )
            os.close(fd)

    def replace(self, dir_fd: int, name: bytes, is_dir: bool) -> None:
        """Turn the upper entry ``name`` into a whiteout (a directory must be merged-empty)."""
        if self.fmt is wh.WhiteoutFormat.AUFS:
            self.make(dir_fd, name)
            remove_entry(dir_fd, name, is_dir)
            return
        tmp = self.temp_name()
        os.mknod(tmp, stat.S_IFCHR, 0, dir_fd=self.work_fd)
        if not is_dir:
            os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=dir_fd)
            return
        renameat2(self.work_fd, tmp, dir_fd, name, RENAME_EXCHANGE)
        remove_entry(self.work_fd, tmp, True)

    def clear(self, dir_fd: int, name: bytes) -> bool:
        """Remove a whiteout of ``name`` in this upper directory (either format); True if any."""
        removed = False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if wh.is_overlay_whiteout(st):
                os.unlink(name, dir_fd=dir_fd)
                removed = True
        except FileNotFoundError:
            pass
        if len(name) <= 251:
            try:
                os.unlink(b".wh." + name, dir_fd=dir_fd)
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def mark_opaque(self, dir_fd: int) -> None:
        """Make the directory hide every lower entry below it."""
        if self.fmt is wh.WhiteoutFormat.OVERLAY:
            os.setxattr(dir_fd, self.opaque_xattr, wh.OPAQUE_VALUE)
        else:
            fd = os.open(
                wh.WHITEOUT_OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444, dir_fd=dir_fd
            )
            os.close(fd)


def remove_entry(dir_fd: int, name: bytes, is_dir: bool) -> None:
    """Remove a file, or a directory with what it holds."""
    if not is_dir:
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, ly.DIR_OPEN_FLAGS, dir_fd=dir_fd)
    try:
        ly.clear_dir(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
