"""Copy a whole file tree exactly: every file type, owners, modes, xattrs, times, holes, hardlinks.

:func:`copy_tree` is what the vfs driver makes a child layer with, and what anything else that
needs a faithful full copy uses. What it keeps, per entry type:

==============  =================================================================================
regular file    data by reflink (``FICLONE``) where the filesystem shares extents, else by
                ``copy_file_range`` (in-kernel), else by ``pread``/``pwrite``; sparse files keep
                their holes (only the extents ``SEEK_DATA``/``SEEK_HOLE`` report are copied, then
                the file is truncated to its size)
hardlinks       every name of one source inode becomes a name of one copied inode, through a
                (st_dev, st_ino) map of the inodes whose names are not all seen yet
directory       made 0700 while it is filled, given its owner, xattrs, mode and times last, after
                its contents (creating entries changes a directory's mtime; a default ACL would
                otherwise be inherited by the copies inside)
symlink         recreated with the same target bytes, never followed
FIFO            ``mkfifo``
socket          ``mknod(S_IFSOCK)``, which works without privilege: a socket stays a socket
                (moby's copy turns sockets into FIFOs; we do not)
char / block    ``mknod`` with the same device number; never opened (``shutil.copytree`` opens
                device nodes and hangs on a rootfs's ``/dev/console``)
==============  =================================================================================

Then for every entry: owner first (``chown`` clears setuid/setgid and file capabilities), then the
xattrs (:mod:`graphdrivers.fsutil.xattrs` decides which), then the mode, then the atime and mtime
in nanoseconds. Symlinks get owner, xattrs and times but no mode (Linux has none for them).

How the walk is done. Directories are walked through file descriptors: every entry is reached as
``name`` relative to its directory's fd (``dir_fd=``, ``O_NOFOLLOW``), so no path longer than one
name is built, trees deeper than ``PATH_MAX`` copy, and a symlink swapped in by someone else is
not followed. At most :data:`FD_WINDOW` directory levels keep their fds open; a deeper tree
closes the oldest ones and reopens them through ``..`` on the way back up (checking that the
directory reopened is the same inode). Memory stays flat: one directory's names at a time per
level, the map of hardlinked inodes still missing names, and one buffer for the read/write
fallback. Source files and directories are opened with ``O_NOATIME`` where allowed, so that a
copy does not change the source's access times.

Failure. ``dst`` must not exist; its parent must. If the copy fails, what was made of ``dst`` is
removed and a :class:`~graphdrivers.errors.DriverError` names the entry that failed (the
``OSError`` is its ``__cause__``). If the process dies, the partial ``dst`` stays: copy into a
staging directory and rename (as the vfs driver does) when that matters. Nothing is fsync'ed.

Ownership as non-root: an owner the caller may not give away (``EPERM``) is left as the caller's
and counted in :attr:`CopyStats.owners_not_kept`; as root every owner is reproduced or the copy
fails. Device nodes need ``CAP_MKNOD``: without it the copy fails on the first one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphdrivers.errors import DriverError
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.fsutil.xattrs import XattrCopier, at

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share all of the source's extents with the target
FD_WINDOW = 64  # directory levels whose fds stay open; deeper ones are reopened through ".."
RW_CHUNK = 1 << 20  # buffer size of the read/write fallback

_O_NOATIME = getattr(os, "O_NOATIME", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DST_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# errnos meaning "this way of copying does not work between these filesystems".
_REFLINK_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.ENOSYS})
_COPY_RANGE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EINVAL})


class CopyMethod(enum.StrEnum):
    """How a regular file's data was copied, best first."""

    REFLINK = "reflink"
    COPY_FILE_RANGE = "copy_file_range"
    READ_WRITE = "read-write"


@dataclasses.dataclass
class CopyStats:
    """What one :func:`copy_tree` made."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0  # extra names of an inode already copied
    fifos: int = 0
    sockets: int = 0
    devices: int = 0
    bytes: int = 0  # apparent size of the regular files (each inode once)
    data_bytes: int = 0  # bytes of data extents copied or cloned (holes are not counted)
    xattrs: int = 0
    xattrs_skipped: int = 0
    owners_not_kept: int = 0
    methods: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def method(self) -> CopyMethod | None:
        """The data-copy method used for the most files (None when no file had data)."""
        if not self.methods:
            return None
        return CopyMethod(max(self.methods, key=lambda m: self.methods[m]))


def copy_tree(src: Path | str, dst: Path | str) -> CopyStats:
    """Copy the tree at ``src`` to the new directory ``dst`` exactly (see the module docstring).

    ``src`` is resolved like any path; nothing below it is followed. ``dst`` must not exist and
    must not lie inside ``src``. Raises :class:`~graphdrivers.errors.DriverError`.
    """
    src, dst = Path(src), Path(dst)
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if real_dst == real_src or real_src in real_dst.parents:
        raise DriverError(f"copy_tree: destination {dst} lies inside the source {src}", path=dst)

    try:  # the root may be reached through a symlink; nothing below it is followed
        src_fd = _open_dir(os.fspath(src), follow=True)
    except OSError as exc:
        raise DriverError(
            f"copy_tree: cannot open source {src}: {exc.strerror}", path=src
        ) from exc
    try:
        st = os.fstat(src_fd)
        os.mkdir(dst, 0o700)
    except FileExistsError as exc:
        os.close(src_fd)
        raise DriverError(f"copy_tree: destination {dst} already exists", path=dst) from exc
    except OSError as exc:
        os.close(src_fd)
        raise DriverError(f"copy_tree: cannot create {dst}: {exc.strerror}", path=dst) from exc

    copier = _TreeCopier(src, dst)
    try:
        copier.run(src_fd, st)
    except BaseException:
        remove_tree(dst)
        raise
    return copier.stats


def probe_copy_method(directory: Path) -> CopyMethod:
    """The best data-copy method between two files made in ``directory`` (removed after)."""
    fd_a, name_a = tempfile.mkstemp(prefix=".probe-", dir=directory)
    fd_b, name_b = tempfile.mkstemp(prefix=".probe-", dir=directory)
    try:
        os.write(fd_a, b"\0" * 4096)
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd_b, FICLONE, fd_a)
            return CopyMethod.REFLINK
        with contextlib.suppress(OSError):
            os.copy_file_range(fd_a, fd_b, 4096, 0, 0)
            return CopyMethod.COPY_FILE_RANGE
        return CopyMethod.READ_WRITE
    finally:
        for fd, name in ((fd_a, name_a), (fd_b, name_b)):
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _open_dir(path: str, dir_fd: int | None = None, *, follow: bool = False) -> int:
    """Open a directory (a symlink at the last component only if ``follow``), O_NOATIME if
    allowed."""
    flags = _DIR_FLAGS & ~os.O_NOFOLLOW if follow else _DIR_FLAGS
    try:
        return os.open(path, flags | _O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)


@dataclasses.dataclass(slots=True)
class _Level:
    """One directory being copied: its source stat, both fds (-1 while parked), names left."""

    name: str
    st: os.stat_result
    src_fd: int
    dst_fd: int
    dst_ino: tuple[int, int]
    names: Iterator[str]


class _TreeCopier:
    """The state of one copy_tree: statistics, fallback decisions, the hardlink map."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src = src
        self.dst = dst
        self.stats = CopyStats()
        self.xattrs = XattrCopier()
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.root = self.euid == 0
        self.no_reflink: set[int] = set()  # source st_dev values where FICLONE failed
        self.no_copy_range: set[int] = set()  # ... where copy_file_range failed
        self.links: dict[tuple[int, int], list[object]] = {}  # inode -> [dst relpath, seen]
        self.stack: list[_Level] = []
        self.dst_root_fd = -1
        self.current = ""  # the entry of the top level being copied (for error messages)
        self._buf: bytearray | None = None
        self._logged: set[str] = set()

    # ----------------------------------------------------------------- the walk

    def run(self, src_fd: int, st: os.stat_result) -> None:
        """Copy the tree open as ``src_fd`` into the empty ``self.dst``; closes ``src_fd``."""
        try:
            dst_fd = os.open(self.dst, _DIR_FLAGS)
        except BaseException:
            os.close(src_fd)
            raise
        try:
            self.dst_root_fd = os.dup(dst_fd)
            try:
                root = self._level("", st, src_fd, dst_fd)
            except BaseException:
                os.close(src_fd)
                os.close(dst_fd)
                raise
            self.stack.append(root)
            self._walk()
        except OSError as exc:
            where = self._where()
            raise DriverError(
                f"copy_tree: copying {self.src / where} to {self.dst / where} failed: "
                f"{exc.strerror or exc}",
                path=self.src / where,
            ) from exc
        finally:
            for level in self.stack:
                self._close(level)
            if self.dst_root_fd >= 0:
                os.close(self.dst_root_fd)
        self.stats.xattrs = self.xattrs.copied
        self.stats.xattrs_skipped = self.xattrs.skipped

    def _level(self, name: str, st: os.stat_result, src_fd: int, dst_fd: int) -> _Level:
        dst_st = os.fstat(dst_fd)
        names = iter(os.listdir(src_fd))
        return _Level(name, st, src_fd, dst_fd, (dst_st.st_dev, dst_st.st_ino), names)

    def _walk(self) -> None:
        stack = self.stack
        while stack:
            top = stack[-1]
            name = next(top.names, None)
            if name is None:
                self._finish_dir(top)
                stack.pop()
                if stack and stack[-1].src_fd < 0:
                    self._unpark(stack[-1], top)
                self._close(top)
                continue

            self.current = name
            st = os.stat(name, dir_fd=top.src_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                self._enter_dir(top, name, st)
            elif st.st_nlink > 1 and self._link_existing(top, name, st):
                pass
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(top, name, st)
            elif stat.S_ISLNK(st.st_mode):
                self._copy_symlink(top, name, st)
            else:
                self._copy_special(top, name, st)
            self.current = ""

    def _where(self) -> str:
        """The path, relative to the tree root, of the entry being copied (for errors)."""
        parts = [level.name for level in self.stack[1:]]
        if self.current:
            parts.append(self.current)
        return "/".join(parts) or "."

    def _enter_dir(self, top: _Level, name: str, st: os.stat_result) -> None:
        os.mkdir(name, 0o700, dir_fd=top.dst_fd)
        src_fd = _open_dir(name, top.src_fd)
        try:
            dst_fd = os.open(name, _DIR_FLAGS, dir_fd=top.dst_fd)
        except BaseException:
            os.close(src_fd)
            raise
        try:
            level = self._level(name, st, src_fd, dst_fd)
        except BaseException:
            os.close(src_fd)
            os.close(dst_fd)
            raise
        self.stack.append(level)
        self.stats.dirs += 1
        self.current = ""

        deep = len(self.stack) - 1 - FD_WINDOW
        if deep >= 0 and self.stack[deep].src_fd >= 0:
            self._close(self.stack[deep])

    def _unpark(self, level: _Level, child: _Level) -> None:
        """Reopen a parked level through the '..' of its child and check it is the same one."""
        level.src_fd = _open_dir("..", child.src_fd)
        level.dst_fd = os.open("..", _DIR_FLAGS, dir_fd=child.dst_fd)
        src_st, dst_st = os.fstat(level.src_fd), os.fstat(level.dst_fd)
        if (src_st.st_dev, src_st.st_ino) != (level.st.st_dev, level.st.st_ino) or (
            dst_st.st_dev,
            dst_st.st_ino,
        ) != level.dst_ino:
            raise DriverError(
                f"copy_tree: a directory of {self.src} or {self.dst} was moved during the copy",
                path=self.src,
            )

    @staticmethod
    def _close(level: _Level) -> None:
        for fd in (level.src_fd, level.dst_fd):
            if fd >= 0:
                os.close(fd)
        level.src_fd = level.dst_fd = -1

    def _finish_dir(self, level: _Level) -> None:
        st = level.st
        self._chown(st, level.dst_fd)
        self.xattrs.copy(level.src_fd, level.dst_fd)
        os.fchmod(level.dst_fd, stat.S_IMODE(st.st_mode))
        os.utime(level.dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    # ----------------------------------------------------------------- entries

    def _copy_file(self, top: _Level, name: str, st: os.stat_result) -> None:
        try:
            sfd = os.open(name, _SRC_FLAGS | _O_NOATIME, dir_fd=top.src_fd)
        except PermissionError:
            sfd = os.open(name, _SRC_FLAGS, dir_fd=top.src_fd)
        try:
            dfd = os.open(name, _DST_FLAGS, 0o600, dir_fd=top.dst_fd)
            try:
                if st.st_size:
                    self._copy_data(sfd, dfd, st)
                self._chown(st, dfd)
                self.xattrs.copy(sfd, dfd)
                os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

        self.stats.files += 1
        self.stats.bytes += st.st_size
        if st.st_nlink > 1:
            self._remember_link(name, st)

    def _copy_symlink(self, top: _Level, name: str, st: os.stat_result) -> None:
        target = os.readlink(name, dir_fd=top.src_fd)
        os.symlink(target, name, dir_fd=top.dst_fd)
        self._chown(st, None, name, top.dst_fd)
        self.xattrs.copy(at(top.src_fd, name), at(top.dst_fd, name))
        os.utime(
            name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top.dst_fd, follow_symlinks=False
        )
        self.stats.symlinks += 1
        if st.st_nlink > 1:
            self._remember_link(name, st)

    def _copy_special(self, top: _Level, name: str, st: os.stat_result) -> None:
        kind = stat.S_IFMT(st.st_mode)
        perm = stat.S_IMODE(st.st_mode)
        if kind == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=top.dst_fd)
            self.stats.fifos += 1
        elif kind == stat.S_IFSOCK:
            os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=top.dst_fd)
            self.stats.sockets += 1
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(name, kind | 0o600, st.st_rdev, dir_fd=top.dst_fd)
            self.stats.devices += 1
        else:
            raise DriverError(
                f"copy_tree: {self.src / self._where()} has unknown file type {kind:o}",
                path=self.src / self._where(),
            )

        self._chown(st, None, name, top.dst_fd)
        self.xattrs.copy(at(top.src_fd, name), at(top.dst_fd, name))
        os.chmod(name, perm, dir_fd=top.dst_fd)
        os.utime(
            name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top.dst_fd, follow_symlinks=False
        )
        if st.st_nlink > 1:
            self._remember_link(name, st)

    # ----------------------------------------------------------------- hardlinks

    def _relpath(self, name: str) -> str:
        return "/".join([*(level.name for level in self.stack[1:]), name])

    def _remember_link(self, name: str, st: os.stat_result) -> None:
        # Limitation: the first name is kept as a path from the copy's root; a hardlinked file
        # whose path is longer than PATH_MAX cannot be linked to (ENAMETOOLONG fails the copy).
        self.links[(st.st_dev, st.st_ino)] = [self._relpath(name), 1]

    def _link_existing(self, top: _Level, name: str, st: os.stat_result) -> bool:
        """Link ``name`` to the copy of its inode if one was made already; True if done."""
        entry = self.links.get((st.st_dev, st.st_ino))
        if entry is None:
            return False

        first, seen = entry
        assert isinstance(first, str) and isinstance(seen, int)
        os.link(
            first, name, src_dir_fd=self.dst_root_fd, dst_dir_fd=top.dst_fd, follow_symlinks=False
        )
        self.stats.hardlinks += 1
        if seen + 1 >= st.st_nlink:
            del self.links[(st.st_dev, st.st_ino)]  # every name seen: forget the inode
        else:
            entry[1] = seen + 1
        return True

    # ----------------------------------------------------------------- owners

    def _chown(
        self, st: os.stat_result, fd: int | None, name: str | None = None, dir_fd: int = -1
    ) -> None:
        """Give the copy ``st``'s owner; new entries already belong to the caller."""
        if st.st_uid == self.euid and st.st_gid == self.egid:
            return
        try:
            if fd is not None:
                os.fchown(fd, st.st_uid, st.st_gid)
            else:
                assert name is not None
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        except PermissionError:
            if self.root:
                raise
            self.stats.owners_not_kept += 1
            self._once("owner", "not root: files owned by others are copied as the caller's")

    # ----------------------------------------------------------------- file data

    def _copy_data(self, sfd: int, dfd: int, st: os.stat_result) -> None:
        """Copy a regular file's data: reflink, else extent by extent keeping holes."""
        dev = st.st_dev
        if dev not in self.no_reflink:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError as exc:
                if exc.errno in _REFLINK_UNSUPPORTED:
                    self.no_reflink.add(dev)
                    self._once(
                        f"reflink{dev}",
                        f"no reflink from device {dev:#x} to {self.dst} "
                        f"({exc.strerror}); copying data",
                    )
                else:  # e.g. EINVAL for one file (btrfs nodatacow mismatch): just this file
                    self._once(f"reflink-{exc.errno}", f"reflink refused ({exc.strerror})")
            else:
                self._count(CopyMethod.REFLINK)
                self.stats.data_bytes += st.st_size
                return

        sparse = st.st_blocks * 512 < st.st_size
        extents = _data_extents(sfd, st.st_size) if sparse else iter([(0, st.st_size)])
        method = CopyMethod.COPY_FILE_RANGE
        for start, end in extents:
            method = self._copy_range(sfd, dfd, start, end, dev)
        if sparse:
            os.ftruncate(dfd, st.st_size)
        self._count(method)

    def _copy_range(self, sfd: int, dfd: int, start: int, end: int, dev: int) -> CopyMethod:
        """Copy bytes [start, end) at the same offsets; returns the method that did it."""
        pos = start
        if dev not in self.no_copy_range:
            try:
                while pos < end:
                    n = os.copy_file_range(sfd, dfd, end - pos, pos, pos)
                    if n == 0:  # the source is shorter than it was when stat'ed
                        break
                    pos += n
                self.stats.data_bytes += pos - start
                return CopyMethod.COPY_FILE_RANGE
            except OSError as exc:
                if exc.errno not in _COPY_RANGE_UNSUPPORTED:
                    raise
                self.no_copy_range.add(dev)
                self._once(
                    f"cfr{dev}",
                    f"no copy_file_range from device {dev:#x} to "
                    f"{self.dst} ({exc.strerror}); using read/write",
                )

        if self._buf is None:
            self._buf = bytearray(RW_CHUNK)
        view = memoryview(self._buf)
        while pos < end:
            n = os.preadv(sfd, [view[: min(RW_CHUNK, end - pos)]], pos)
            if n == 0:
                break
            done = 0
            while done < n:
                done += os.pwrite(dfd, view[done:n], pos + done)
            pos += n
            self.stats.data_bytes += n
        return CopyMethod.READ_WRITE

    def _count(self, method: CopyMethod) -> None:
        self.stats.methods[method.value] = self.stats.methods.get(method.value, 0) + 1

    def _once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.debug("%s", message)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of ``fd`` that hold data, from SEEK_DATA / SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                return
            if exc.errno == errno.EINVAL and pos == 0:  # no SEEK_DATA here: all data
                yield 0, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end
        pos = end
