"""Shared helpers for the fusemount tests: an in-process harness that drives the Operations
class the way the kernel would (lookups, readdirplus, forgets), the invariants every upper dir
must satisfy, and a real-mount context manager that runs the daemon as a subprocess."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3

from fusemount import main as fm_main
from fusemount import options
from fusemount.layers import WORK_SUBDIR
from fusemount.ops import UnionOperations
from graphdrivers import whiteout as wh

ROOT = pyfuse3.ROOT_INODE
FUSEMOUNT = [sys.executable, "-m", "fusemount.main"]


class Ctx:
    """The request context a kernel request carries (root caller)."""

    uid = 0
    gid = 0
    pid = os.getpid()
    umask = 0


CTX: Any = Ctx()


def fields(**updates: bool) -> Any:
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    values = {f"update_{n}": False for n in names}
    values.update({f"update_{k}": v for k, v in updates.items()})
    return types.SimpleNamespace(**values)


class Harness:
    """An Operations instance over layer dirs in a temp dir, called without any mount."""

    def __init__(
        self,
        lowers: list[Path],
        upper: Path | None,
        work: Path | None,
        whiteout: wh.WhiteoutFormat = wh.WhiteoutFormat.OVERLAY,
    ) -> None:
        self.lowers, self.upper, self.work, self.whiteout = lowers, upper, work, whiteout
        opts = options.MountOptions(
            mountpoint="/nonexistent",
            lowerdirs=[str(p) for p in lowers],
            upperdir=str(upper) if upper else None,
            workdir=str(work) if work else None,
            whiteout=whiteout,
        )
        self.ops: UnionOperations = fm_main.build(opts, fd_capacity=64)
        self.ops.readdir_reply = self._reply
        self._listing: list[tuple[bytes, Any]] = []

    def _reply(self, token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        self._listing.append((name, attr))
        return True

    async def lookup(self, path: str) -> Any:
        """Attributes of ``path`` (``/``-separated), looking up each component."""
        attr = await self.ops.getattr(ROOT, CTX)
        for part in [p for p in path.split("/") if p]:
            attr = await self.ops.lookup(attr.st_ino, os.fsencode(part), CTX)
            if attr.st_ino == 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def ino(self, path: str) -> int:
        return int((await self.lookup(path)).st_ino)

    async def listdir(self, path: str = "") -> dict[str, Any]:
        fh = await self.ops.opendir(await self.ino(path), CTX)
        self._listing = []
        await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        await self.ops.releasedir(fh)
        return {os.fsdecode(name): attr for name, attr in self._listing}

    async def read(self, path: str) -> bytes:
        info = await self.ops.open(await self.ino(path), os.O_RDONLY, CTX)
        try:
            return await self.ops.read(info.fh, 0, 1 << 24)
        finally:
            await self.ops.release(info.fh)

    async def write(self, path: str, data: bytes, offset: int = 0) -> None:
        info = await self.ops.open(await self.ino(path), os.O_WRONLY, CTX)
        try:
            await self.ops.write(info.fh, offset, data)
        finally:
            await self.ops.release(info.fh)

    async def create(self, path: str, data: bytes = b"", mode: int = 0o644) -> int:
        parent, _, name = path.rpartition("/")
        info, attr = await self.ops.create(
            await self.ino(parent), os.fsencode(name), stat.S_IFREG | mode, os.O_WRONLY, CTX
        )
        if data:
            await self.ops.write(info.fh, 0, data)
        await self.ops.release(info.fh)
        return int(attr.st_ino)

    async def mkdir(self, path: str, mode: int = 0o755) -> int:
        parent, _, name = path.rpartition("/")
        attr = await self.ops.mkdir(
            await self.ino(parent), os.fsencode(name), stat.S_IFDIR | mode, CTX
        )
        return int(attr.st_ino)

    async def unlink(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.unlink(await self.ino(parent), os.fsencode(name), CTX)

    async def rmdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.rmdir(await self.ino(parent), os.fsencode(name), CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        op, _, on = old.rpartition("/")
        np, _, nn = new.rpartition("/")
        await self.ops.rename(
            await self.ino(op), os.fsencode(on), await self.ino(np), os.fsencode(nn), flags, CTX
        )

    def close(self) -> None:
        self.ops.close()


# -- invariants of an upper dir --------------------------------------------------------------


def upper_entries(upper: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            yield path, path.lstat()


def check_format(upper: Path, fmt: wh.WhiteoutFormat) -> None:
    """Whiteouts and opaque markers in the upper are all in the chosen format."""
    for path, st in upper_entries(upper):
        if fmt is wh.WhiteoutFormat.AUFS:
            assert not wh.is_overlay_whiteout(st), f"overlay whiteout {path} in an aufs upper"
            if stat.S_ISDIR(st.st_mode):
                assert wh.OVERLAY_OPAQUE_XATTR not in os.listxattr(path), path
        else:
            assert not path.name.startswith(".wh."), f"aufs marker {path} in an overlay upper"


async def check_upper(h: Harness) -> None:
    """The work dir is empty, the format is consistent, and every upper entry that is not a
    whiteout has the attributes the merged view shows for it."""
    if h.work is not None:
        assert os.listdir(h.work / WORK_SUBDIR) == [], "leftover in the work dir"
    if h.upper is None:
        return
    check_format(h.upper, h.whiteout)
    for path, st in upper_entries(h.upper):
        rel = path.relative_to(h.upper).as_posix()
        if path.name.startswith(".wh.") or wh.is_overlay_whiteout(st):
            continue
        if any(part.startswith(".wh.") for part in Path(rel).parts):
            continue
        attr = await h.lookup(rel)
        got = (attr.st_mode, attr.st_uid, attr.st_gid, attr.st_mtime_ns)
        assert got == (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), rel
        if not stat.S_ISDIR(st.st_mode):
            assert (attr.st_size, attr.st_nlink) == (st.st_size, st.st_nlink), rel


# -- real mounts ------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait (bounded poll) until process ``pid`` no longer exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # exited; init reaps it in its own time
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def mounted(
    mnt: Path,
    lowers: list[Path],
    upper: Path | None = None,
    work: Path | None = None,
    extra: str = "",
) -> Iterator[int]:
    """Run the fusemount daemon on ``mnt``; yields its pid; always unmounts and waits."""
    pidfile = mnt.parent / f".{mnt.name}.pid"
    logfile = mnt.parent / f".{mnt.name}.log"
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += f",pidfile={pidfile},log={logfile}"
    if extra:
        opts += "," + extra
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run(
        [*FUSEMOUNT, "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    try:
        yield pid
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        if not wait_gone(pid):
            os.kill(pid, 9)
            wait_gone(pid)
        assert not is_mounted(mnt)
        log = logfile.read_text() if logfile.exists() else ""
        assert "Traceback" not in log, log
