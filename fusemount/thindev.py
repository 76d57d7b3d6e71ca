"""A FUSE daemon that exposes the thin devices of a userspace thin pool as files.

The kernel cannot reach a pool that lives in a Python process, but it can attach a loop device
to a file and mount a kernel filesystem on that. This daemon owns one pool
(:mod:`graphdrivers.thinpool`) and serves a directory::

    MNT/
    ├── control        write a message, read the pool status
    └── thin-<dev id>  one file per active thin device; reads and writes go through the pool

Reading ``control`` gives ``key value`` lines: transaction_id, metadata and data (used/total
blocks), data_block_size (sectors), devices and active (device ids). Messages are the kernel
thin-pool target's (``create_thin N``, ``create_snap N ORIGIN``,
``delete N``, ``set_transaction_id OLD NEW``) plus what ``dmsetup create``/``remove`` of a
thin table would do (``activate N SIZE_BYTES``, ``deactivate N``) and ``commit``. A message
that fails makes the write fail with an errno: EEXIST, ENOENT, EBUSY, EINVAL, ENOSPC.

Data becomes durable when the kernel flushes the file (fsync from the loop device), once a
second while there are uncommitted writes, and when the daemon stops. The daemon is started as
``python -m fusemount.thindev -o metadata=M,data=D [-o ready_fd=N] MNT`` and writes ``ready``
to the file descriptor ``ready_fd`` once the mount is live; it stops on unmount, SIGTERM or
SIGINT, committing first.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from graphdrivers.thinpool import (
    DeviceExists,
    DeviceNotFound,
    NoSpace,
    ThinPool,
    ThinPoolError,
    TransactionMismatch,
)
from graphdrivers.thinpool.messages import POOL_MESSAGES, send_message

log = logging.getLogger(__name__)

CONTROL_NAME = "control"
DEVICE_PREFIX = "thin-"
CONTROL_INODE = 2
DEVICE_INODE_BASE = 1000
COMMIT_INTERVAL = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def guarded(func: F) -> F:
    """Turn any unexpected exception into EIO: one escaping a handler would end the daemon."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("handler %s failed", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class ThinDeviceFS(pyfuse3.Operations):
    """The directory of a pool's control file and active thin device files."""

    enable_writeback_cache = False

    def __init__(self, pool: ThinPool) -> None:
        super().__init__()
        self.pool = pool
        self.active: dict[int, int] = {}  # dev id -> size in bytes
        self.open_count: dict[int, int] = {}
        self.dirty = False
        self._reply = b""
        self._started = time.time_ns()

    # ---------------------------------------------------------------- names and attributes

    def _device_of(self, inode: int) -> int:
        dev = inode - DEVICE_INODE_BASE
        if dev not in self.active:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return dev

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._started
        attr.st_blksize = 4096
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o700
            attr.st_nlink = 2
        elif inode == CONTROL_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = 0
        else:
            dev = self._device_of(inode)
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = self.active[dev]
            attr.st_blocks = self.active[dev] // 512
        return attr

    @guarded
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)
        if text == CONTROL_NAME:
            return self._attr(CONTROL_INODE)
        if text.startswith(DEVICE_PREFIX) and text[len(DEVICE_PREFIX) :].isdigit():
            return self._attr(DEVICE_INODE_BASE + int(text[len(DEVICE_PREFIX) :]))
        raise pyfuse3.FUSEError(errno.ENOENT)

    @guarded
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = [(CONTROL_NAME, CONTROL_INODE)] + [
            (f"{DEVICE_PREFIX}{dev}", DEVICE_INODE_BASE + dev) for dev in sorted(self.active)
        ]
        for i, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(inode), i):
                return

    @guarded
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a device's size is set by activate
        return self._attr(inode)

    @guarded
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        status = self.pool.status()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = self.pool.data_block_bytes
        data.f_blocks = status.total_data_blocks
        data.f_bfree = data.f_bavail = status.total_data_blocks - status.used_data_blocks
        data.f_namemax = 255
        return data

    # ---------------------------------------------------------------- i/o

    @guarded
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != CONTROL_INODE:
            dev = self._device_of(inode)
            self.open_count[dev] = self.open_count.get(dev, 0) + 1
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == CONTROL_INODE:
            return self._status_line()[off : off + size]
        dev = self._device_of(fh)
        size = max(0, min(size, self.active[dev] - off))
        return self.pool.device(dev).pread(size, off)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh == CONTROL_INODE:
            self._message(buf.decode(errors="replace").strip())
            return len(buf)
        dev = self._device_of(fh)
        if off + len(buf) > self.active[dev]:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        try:
            self.pool.device(dev).pwrite(bytes(buf), off)
        except NoSpace as exc:
            log.error("pool out of space: %s", exc)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        self.dirty = True
        return len(buf)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.commit()

    @guarded
    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @guarded
    async def release(self, fh: int) -> None:
        if fh != CONTROL_INODE:
            dev = fh - DEVICE_INODE_BASE
            self.open_count[dev] = max(0, self.open_count.get(dev, 0) - 1)
            self.commit()

    def commit(self) -> None:
        if self.dirty:
            self.pool.commit()
            self.dirty = False

    # ---------------------------------------------------------------- messages

    def _status_line(self) -> bytes:
        """What reading the control file gives: one ``key value`` line each."""
        s = self.pool.status()
        lines = [
            f"transaction_id {s.transaction_id}",
            f"metadata {s.used_metadata_blocks}/{s.total_metadata_blocks}",
            f"data {s.used_data_blocks}/{s.total_data_blocks}",
            f"data_block_size {s.data_block_size}",
            "devices " + " ".join(str(d) for d in self.pool.devices()),
            "active " + " ".join(str(d) for d in sorted(self.active)),
        ]
        return ("\n".join(lines) + "\n").encode()

    def _message(self, text: str) -> None:
        """Run one message; a failure becomes the errno of the control file's write."""
        words = text.split()
        log.debug("message: %s", text)
        try:
            self._dispatch(words)
        except DeviceExists as exc:
            log.info("message %r: %s", text, exc)
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        except DeviceNotFound as exc:
            log.info("message %r: %s", text, exc)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NoSpace as exc:
            log.error("message %r: %s", text, exc)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except (TransactionMismatch, ThinPoolError, ValueError, IndexError) as exc:
            log.info("message %r: %s", text, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    def _dispatch(self, words: list[str]) -> None:
        verb = words[0] if words else ""
        if verb in POOL_MESSAGES:
            if verb == "delete" and int(words[1]) in self.active:
                raise pyfuse3.FUSEError(errno.EBUSY)
            self.commit()
            send_message(self.pool, " ".join(words))
        elif verb == "activate":
            dev, size = int(words[1]), int(words[2])
            self.pool.device(dev)  # raises DeviceNotFound
            if size <= 0 or size % 512:
                raise ValueError("device size must be a positive multiple of 512 bytes")
            self.active[dev] = size
        elif verb == "deactivate":
            dev = int(words[1])
            if self.open_count.get(dev, 0):
                raise pyfuse3.FUSEError(errno.EBUSY)
            self.commit()
            self.active.pop(dev, None)
        elif verb == "commit":
            self.dirty = True
            self.commit()
        else:
            raise ValueError(f"unknown message {verb!r}")


async def _serve(fs: ThinDeviceFS) -> None:
    """The daemon's one nursery: the FUSE loop, the periodic commit, the signal watcher."""
    async with trio.open_nursery() as nursery:

        async def commit_periodically() -> None:
            while True:
                await trio.sleep(COMMIT_INTERVAL)
                fs.commit()

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("signal received: unmounting")
                    pyfuse3.terminate()
                    return

        nursery.start_soon(commit_periodically)
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def parse_options(values: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, _, val = item.partition("=")
            options[key.strip()] = val
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusemount-thindev", description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="metadata=FILE,data=FILE[,ready_fd=N][,log=FILE][,debug]",
    )
    args = parser.parse_args(argv)
    options = parse_options(args.options)
    if "metadata" not in options or "data" not in options:
        parser.error("-o metadata=FILE,data=FILE is required")

    logging.basicConfig(
        filename=options.get("log") or None,
        level=logging.DEBUG if "debug" in options else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    pool = ThinPool.open(options["metadata"], options["data"])
    fs = ThinDeviceFS(pool)
    fuse_options = set(pyfuse3.default_options)
    fuse_options.discard("default_permissions")
    fuse_options |= {"fsname=thinpool", "subtype=thindev"}
    pyfuse3.init(fs, args.mountpoint, fuse_options)

    ready_fd = int(options["ready_fd"]) if options.get("ready_fd") else None
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:
        trio.run(_serve, fs)
    finally:
        fs.dirty = True
        fs.commit()
        pyfuse3.close(unmount=True)
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
