"""Which extended attributes a layer carries, and reading them without following symlinks.

A layer records these xattrs (the same set is compared by :func:`changes_dirs`, written by
:func:`export_changes` and restored by :func:`apply_layer`):

- ``user.*`` (not ``user.overlay.*``),
- ``security.capability`` (file capabilities: ``ping``'s ``cap_net_raw``),
- ``trusted.*`` (not ``trusted.overlay.*``), readable and writable only by root.

``*.overlay.*`` names are the union filesystem's own bookkeeping (opaque markers, redirects);
a layer expresses those as whiteout entries instead, and one arriving in a tar is never applied,
because it would change what a union mount shows. Other namespaces (``security.selinux``,
``system.posix_acl_*``) belong to the host's policy, not to the image, and are left out.

Xattrs are read through ``/proc/self/fd/<dir fd>/<name>`` with ``follow_symlinks=False``: the
directory is the one already held open, and the final name is never followed, so a symlink's own
xattrs are read (or set), never its target's.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

CAPABILITY_XATTR = "security.capability"
LAYER_XATTR_PREFIXES = ("user.", "trusted.")
UNION_XATTR_PREFIXES = ("user.overlay.", "trusted.overlay.")
PROC_FD = "/proc/self/fd"

_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA)


def is_layer_xattr(name: str) -> bool:
    """True for xattr names a layer carries (see the module docstring)."""
    if name == CAPABILITY_XATTR:
        return True
    return name.startswith(LAYER_XATTR_PREFIXES) and not name.startswith(UNION_XATTR_PREFIXES)


def fd_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` inside the directory open as ``dir_fd``."""
    return f"{PROC_FD}/{dir_fd}/{name}"


def read_layer_xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    """The layer xattrs of entry ``name`` of the directory ``dir_fd``, sorted by name."""
    return _read(fd_path(dir_fd, name))


def read_fd_xattrs(fd: int) -> dict[str, bytes]:
    """The layer xattrs of the file or directory open as ``fd``, sorted by name."""
    return _read(fd)


def _read(path: int | str) -> dict[str, bytes]:
    try:
        names = (
            os.listxattr(path, follow_symlinks=False)
            if isinstance(path, str)
            else (os.listxattr(path))
        )
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return {}
        raise

    found: dict[str, bytes] = {}
    for key in sorted(n for n in names if is_layer_xattr(n)):
        try:
            if isinstance(path, str):
                found[key] = os.getxattr(path, key, follow_symlinks=False)
            else:
                found[key] = os.getxattr(path, key)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
    return found
