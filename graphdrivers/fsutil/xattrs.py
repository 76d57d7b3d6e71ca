"""Extended attributes: read and write them without following symlinks, and decide which to copy.

Every helper takes a *target*: an open file descriptor (``int``) or a path. A path is never
followed if it names a symlink, so a symlink's own xattrs are read and written, not its
target's. For an entry inside a directory that is open as a file descriptor, :func:`at` builds a
short path through ``/proc/self/fd`` so that deep trees never need their full path spelled out
(Python's xattr calls take no ``dir_fd``, and an ``O_PATH`` descriptor cannot carry xattrs).

Which xattrs a tree copy carries (:func:`policy`), by namespace:

==========================  =========  =====================================================
name                        policy     why
==========================  =========  =====================================================
``user.*``                  required   ordinary data of the file; a copy without it differs
``security.capability``     required   file capabilities are part of what a binary may do
``trusted.*``               required   only root sees or sets them (the kernel hides them from
                                       everyone else, so an unprivileged copy has none to copy);
                                       overlay's ``trusted.overlay.*`` markers live here
``system.posix_acl_*``      required   POSIX ACLs are part of the permissions
other ``security.*``        best-effort  SELinux labels, IMA/EVM: the destination's policy may
                                       refuse them (EPERM, EINVAL, ENOTSUP); skipped then
anything else               skipped    unknown namespaces are not ours to reproduce
==========================  =========  =====================================================

A *required* xattr that cannot be written raises the ``OSError``; the caller decides what that
means (:mod:`graphdrivers.fsutil.copy` turns it into a :class:`~graphdrivers.errors.DriverError`
naming the path). A *best-effort* one is skipped and counted; each reason is logged once at
debug level by :class:`XattrCopier`, not once per file.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

XattrTarget = int | str | Path

PROC_SELF_FD = "/proc/self/fd"
CAPABILITY = "security.capability"
REQUIRED_PREFIXES = ("user.", "trusted.", "system.posix_acl_")
BEST_EFFORT_PREFIXES = ("security.",)

# errnos meaning "this filesystem or inode has no xattrs", not a failure of the file.
NO_XATTR_SUPPORT = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


class XattrPolicy(enum.Enum):
    """What a tree copy does with one xattr (see the module docstring's table)."""

    REQUIRED = "required"
    BEST_EFFORT = "best-effort"
    SKIP = "skip"


def policy(name: str) -> XattrPolicy:
    """How a tree copy treats the xattr ``name``."""
    if name == CAPABILITY or name.startswith(REQUIRED_PREFIXES):
        return XattrPolicy.REQUIRED
    if name.startswith(BEST_EFFORT_PREFIXES):
        return XattrPolicy.BEST_EFFORT
    return XattrPolicy.SKIP


def at(dir_fd: int, name: str) -> str:
    """A short path to ``name`` inside the directory open as ``dir_fd`` (via /proc/self/fd).

    The /proc link resolves to the directory itself; ``name`` is the last component, so the
    ``follow_symlinks=False`` of the helpers below applies to it.
    """
    return f"{PROC_SELF_FD}/{dir_fd}/{name}"


def _target(target: XattrTarget) -> int | str:
    return target if isinstance(target, int) else os.fspath(target)


def list_xattrs(target: XattrTarget) -> list[str]:
    """The xattr names of ``target`` (an fd or a path, not followed); [] if it has none."""
    try:
        if isinstance(target, int):
            return os.listxattr(target)
        return os.listxattr(_target(target), follow_symlinks=False)
    except OSError as exc:
        if exc.errno in NO_XATTR_SUPPORT:
            return []
        raise


def get_xattr(target: XattrTarget, name: str) -> bytes:
    """The value of xattr ``name`` of ``target`` (not followed)."""
    if isinstance(target, int):
        return os.getxattr(target, name)
    return os.getxattr(_target(target), name, follow_symlinks=False)


def set_xattr(target: XattrTarget, name: str, value: bytes) -> None:
    """Set xattr ``name`` of ``target`` (not followed) to ``value``, creating or replacing it."""
    if isinstance(target, int):
        os.setxattr(target, name, value)
    else:
        os.setxattr(_target(target), name, value, follow_symlinks=False)


def read_xattrs(target: XattrTarget) -> dict[str, bytes]:
    """Every xattr of ``target`` as a dict; names that vanish while reading are left out."""
    out = {}
    for name in list_xattrs(target):
        try:
            out[name] = get_xattr(target, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


class XattrCopier:
    """Copies xattrs from one file to another by :func:`policy`, counting what it did.

    One copier serves a whole tree copy, so that each reason for skipping a best-effort xattr
    is logged once, and the counts end up in the copy's statistics.
    """

    def __init__(self) -> None:
        self.copied = 0
        self.skipped = 0
        self._logged: set[tuple[str, int]] = set()

    def copy(self, src: XattrTarget, dst: XattrTarget) -> None:
        """Copy the xattrs of ``src`` to ``dst`` (fds or paths, never followed)."""
        names = list_xattrs(src)
        if not names:
            return

        for name in names:
            rule = policy(name)
            if rule is XattrPolicy.SKIP:
                self._skip(name, 0, "namespace not copied")
                continue
            try:
                value = get_xattr(src, name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:  # removed since listing
                    continue
                raise
            try:
                set_xattr(dst, name, value)
            except OSError as exc:
                if rule is XattrPolicy.REQUIRED:
                    raise
                self._skip(name, exc.errno or 0, exc.strerror or "refused")
                continue
            self.copied += 1

    def _skip(self, name: str, err: int, why: str) -> None:
        self.skipped += 1
        namespace = name.partition(".")[0]
        if (namespace, err) not in self._logged:
            self._logged.add((namespace, err))
            log.debug("not copying xattr %s (and others like it): %s", name, why)
