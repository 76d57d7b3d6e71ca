"""Syscalls the standard library does not expose: renameat2 and its flags.

``renameat2`` gives the union three things plain ``rename`` cannot: ``RENAME_NOREPLACE``
(refuse to overwrite), ``RENAME_EXCHANGE`` (swap two names atomically, used to replace a
directory by a whiteout in one step) and ``RENAME_WHITEOUT`` (leave a 0/0 character device at
the old name, the overlay whiteout, in the same step as the move).
"""

from __future__ import annotations

import ctypes
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# The running program's own symbols include libc's; ctypes.util.find_library("c") would run
# ldconfig in a subprocess at every daemon start.
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; raises ``OSError`` with the kernel's errno."""
    if _renameat2(src_dir_fd, src, dst_dir_fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)
