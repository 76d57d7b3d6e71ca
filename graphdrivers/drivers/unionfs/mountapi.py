"""Mounting kernel overlayfs from Python: the new mount API, the legacy mount(2), and umount2.

The classic ``mount(2)`` takes every overlay option in one string of at most one page, and the
kernel silently cuts a longer one (DESIGN.md, measured facts): at about a hundred absolute lower
paths the mount gets the wrong stack and reports no error. The new mount API (Linux 5.2+,
overlayfs ``lowerdir+`` since 6.8) sets one layer per ``fsconfig`` call instead::

    fs = fsopen("overlay")                      a filesystem context
    fsconfig(fs, SET_FD, "lowerdir+", fd)       one call per lower, topmost first (6.13+), or
    fsconfig(fs, SET_STRING, "lowerdir+", p)    the same by path (6.8+; a value is < 256 bytes)
    fsconfig(fs, SET_STRING, "upperdir", ...)   upper, work, index=off, ...
    fsconfig(fs, CMD_CREATE)                    the superblock
    mnt = fsmount(fs, attrs)                    a detached mount (MOUNT_ATTR_RDONLY for ro)
    move_mount(mnt, "", AT_FDCWD, target)       attached at the mountpoint

:func:`mount_overlay` uses the first of those that works (or the one asked for), and then counts
the lowers the kernel reports in mountinfo, so a stack that is not the one asked for is
unmounted and reported instead of used. The kernel's own error text (read from the context fd)
goes into the :class:`~graphdrivers.errors.MountError`.

The syscall numbers below are the same on every architecture: they come from the common table
the kernel started with ``open_tree`` (428).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphdrivers.errors import MountError
from graphdrivers.fsutil.fstype import mounts

log = logging.getLogger(__name__)

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

MS_RDONLY = 0x1
MNT_DETACH = 0x2

#: the longest option string mount(2) takes whole (one page minus the terminating NUL)
LEGACY_OPTIONS_MAX = os.sysconf("SC_PAGE_SIZE") - 1
#: the longest value fsconfig(FSCONFIG_SET_STRING) accepts
FSCONFIG_STRING_MAX = 255
OVERLAY_SOURCE = "overlay"


class MountApi(enum.StrEnum):
    """How layers are handed to the kernel (the driver option ``mount_api``)."""

    AUTO = "auto"  # the first of fd, path, legacy that this kernel takes
    FD = "fd"  # fsconfig lowerdir+ with O_PATH fds: no length limit at all (6.13+)
    PATH = "path"  # fsconfig lowerdir+ with paths, each < 256 bytes (6.8+)
    LEGACY = "legacy"  # one mount(2) option string, at most a page


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _Unsupported(Exception):
    """This way of mounting is not available on this kernel; try the next one."""


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _context_messages(fs_fd: int) -> str:
    """The kernel's messages for a filesystem context ("e overlayfs: ...")."""
    lines = []
    while True:
        try:
            lines.append(os.read(fs_fd, 4096).decode(errors="replace").strip())
        except OSError:
            return "; ".join(lines)


def _fsconfig_string(fs_fd: int, key: str, value: str) -> None:
    _syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0)


def _fsconfig_fd(fs_fd: int, key: str, fd: int) -> None:
    _syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_SET_FD, key.encode(), None, fd)


def _set_layer(fs_fd: int, key: str, path: Path, api: MountApi, *, probe: bool) -> None:
    """Hand one layer directory to the context, by O_PATH fd or by path.

    With ``probe`` (the first layer), EINVAL means the kernel lacks this way of passing layers.
    """
    if api is MountApi.FD:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fsconfig_fd(fs_fd, key, fd)
        except OSError as exc:
            if probe and exc.errno == errno.EINVAL:
                raise _Unsupported(f"fsconfig {key} by file descriptor (Linux 6.13)") from exc
            raise
        finally:
            os.close(fd)
        return

    value = os.fspath(path)
    if len(os.fsencode(value)) > FSCONFIG_STRING_MAX:
        raise MountError(
            f"layer path {value!r} is longer than the {FSCONFIG_STRING_MAX} bytes fsconfig "
            "takes; use a shorter home directory",
            path=value,
        )
    try:
        _fsconfig_string(fs_fd, key, value)
    except OSError as exc:
        if probe and exc.errno == errno.EINVAL:
            raise _Unsupported("overlayfs option lowerdir+ (Linux 6.8)") from exc
        raise


def _mount_new_api(
    target: Path,
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    options: Mapping[str, str],
    readonly: bool,
    api: MountApi,
) -> None:
    try:
        fs_fd = _syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    except OSError as exc:
        raise _Unsupported(f"fsopen(2): {exc.strerror}") from exc

    try:
        _fsconfig_string(fs_fd, "source", OVERLAY_SOURCE)
        for i, lower in enumerate(lowers):
            _set_layer(fs_fd, "lowerdir+", lower, api, probe=i == 0)
        if upper is not None and work is not None:
            _set_layer(fs_fd, "upperdir", upper, api, probe=False)
            _set_layer(fs_fd, "workdir", work, api, probe=False)
        for key, value in options.items():
            _fsconfig_string(fs_fd, key, value)
        _syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_CMD_CREATE, None, None, 0)

        attrs = MOUNT_ATTR_RDONLY if readonly else 0
        mnt_fd = _syscall(SYS_FSMOUNT, fs_fd, FSMOUNT_CLOEXEC, attrs)
        try:
            _syscall(
                SYS_MOVE_MOUNT, mnt_fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            )
        finally:
            os.close(mnt_fd)
    except OSError as exc:
        detail = _context_messages(fs_fd)
        raise MountError(
            f"mounting overlay at {target} failed: {exc.strerror}"
            + (f" ({detail})" if detail else ""),
            path=target,
        ) from exc
    finally:
        os.close(fs_fd)


def legacy_options(
    lowers: Sequence[Path], upper: Path | None, work: Path | None, options: Mapping[str, str]
) -> str:
    """The mount(2) option string for a stack (paths must not hold ':' or ',')."""
    parts = ["lowerdir=" + ":".join(os.fspath(p) for p in lowers)]
    if upper is not None and work is not None:
        parts += [f"upperdir={upper}", f"workdir={work}"]
    parts += [f"{key}={value}" for key, value in options.items()]
    return ",".join(parts)


def _mount_legacy(
    target: Path,
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    options: Mapping[str, str],
    readonly: bool,
) -> None:
    data = legacy_options(lowers, upper, work, options)
    if len(data.encode()) > LEGACY_OPTIONS_MAX:
        raise MountError(
            f"the overlay options for {target} are {len(data)} bytes; mount(2) takes at most "
            f"{LEGACY_OPTIONS_MAX} and would cut the rest off, mounting the wrong stack; use "
            "mount_api=fd or path (Linux 6.8+)",
            path=target,
            expected=LEGACY_OPTIONS_MAX,
            got=len(data),
        )

    flags = MS_RDONLY if readonly else 0
    result = _libc.mount(
        OVERLAY_SOURCE.encode(), os.fsencode(target), b"overlay", flags, data.encode()
    )
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"mount(2) of overlay at {target} failed: {os.strerror(err)}", path=target
        )


def mount_overlay(
    target: Path,
    lowers: Sequence[Path],
    upper: Path | None = None,
    work: Path | None = None,
    *,
    options: Mapping[str, str] | None = None,
    readonly: bool = False,
    api: MountApi = MountApi.AUTO,
) -> MountApi:
    """Mount overlayfs at ``target`` with ``lowers`` (topmost first); return the API used.

    Without ``upper`` the mount has only lowers, which the kernel makes read-only (it needs two
    lowers then). After mounting, the lowers the kernel reports are counted; a mismatch unmounts
    and raises :class:`MountError`.
    """
    opts = dict(options or {})
    tried = [MountApi.FD, MountApi.PATH, MountApi.LEGACY] if api is MountApi.AUTO else [api]
    used: MountApi | None = None
    for candidate in tried:
        try:
            if candidate is MountApi.LEGACY:
                _mount_legacy(target, lowers, upper, work, opts, readonly)
            else:
                _mount_new_api(target, lowers, upper, work, opts, readonly, candidate)
        except _Unsupported as exc:
            if api is not MountApi.AUTO:
                raise MountError(
                    f"mount_api={api.value} is not available: {exc}", path=target
                ) from exc
            log.debug("overlay mount: %s unavailable (%s), trying the next way", candidate, exc)
            continue
        used = candidate
        break
    assert used is not None  # legacy never raises _Unsupported

    got = count_lowers(target)
    if got != len(lowers):
        unmount(target, lazy=True)
        raise MountError(
            f"overlay at {target} has {got} lower layers, not the {len(lowers)} asked for; "
            "the kernel took a different stack than requested",
            path=target,
            expected=len(lowers),
            got=got,
        )
    return used


def count_lowers(target: Path) -> int:
    """How many lower layers the overlay mounted at ``target`` has (from mountinfo), or -1."""
    entry = next((e for e in reversed(mounts()) if e.target == target), None)
    if entry is None or entry.fstype != "overlay":
        return -1

    count = 0
    for option in _split_options(entry.options):
        key, _, value = option.partition("=")
        if key == "lowerdir+":
            count += 1
        elif key == "lowerdir":
            count += len(_split_unescaped(value, ":"))
    return count


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash (as overlayfs shows options)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _split_options(options: str) -> list[str]:
    return _split_unescaped(options, ",")


def unmount(target: Path, *, lazy: bool = False) -> None:
    """umount2(2) ``target``; a busy mount is detached (MNT_DETACH) instead of failing."""
    flags = MNT_DETACH if lazy else 0
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return

    err = ctypes.get_errno()
    if err == errno.EBUSY and not lazy:
        log.debug("%s is busy; detaching it (it goes when its last user closes it)", target)
        unmount(target, lazy=True)
        return
    raise MountError(f"unmounting {target} failed: {os.strerror(err)}", path=target)
