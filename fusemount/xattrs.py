"""Extended attributes: which names are the union's own (hidden from users) and copying them.

Hidden, never listed, read or written through the mount: the overlay namespace
(``trusted.overlay.*``, ``user.overlay.*``: opaque markers, kernel overlayfs bookkeeping) and
ours (``user.fusemount.*``, ``trusted.fusemount.*``: the recorded origin).
Everything else is user data and is copied on copy-up, ``security.capability`` included.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

HIDDEN_PREFIXES = (
    "trusted.overlay.",
    "user.overlay.",
    "user.fusemount.",
    "trusted.fusemount.",
)


def is_hidden(name: str) -> bool:
    return name.startswith(HIDDEN_PREFIXES)


def listed(path: bytes | int, follow: bool) -> list[str]:
    """The user-visible xattr names of an entry."""
    try:
        if isinstance(path, int):
            names = os.listxattr(path)
        else:
            names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    return [name for name in names if not is_hidden(name)]


def copy_all(src: bytes | int, src_follow: bool, dst: bytes | int, dst_follow: bool) -> None:
    """Copy every user-visible xattr of ``src`` onto ``dst``."""
    for name in listed(src, src_follow):
        if isinstance(src, int):
            value = os.getxattr(src, name)
        else:
            value = os.getxattr(src, name, follow_symlinks=src_follow)
        if isinstance(dst, int):
            os.setxattr(dst, name, value)
        else:
            os.setxattr(dst, name, value, follow_symlinks=dst_follow)
