"""A throw-away btrfs filesystem in a sparse image file, attached to a loop device and mounted.

The btrfs driver needs its home on btrfs. A host whose root is not btrfs can still run it on a
loopback image; tests, ``graphdrivers conformance btrfs`` and ``graphdrivers compare`` make one
with :func:`loopback_btrfs` and throw it away afterwards::

    WORKDIR/                     tempfile.mkdtemp(prefix=PREFIX), 0700
    ├── btrfs.img                IMAGE_NAME: sparse file, mkfs.btrfs'ed
    └── mnt/                     MOUNT_NAME: the image, mounted through /dev/loopN

The steps are done one at a time (``losetup --find --show``, ``mount``) rather than with
``mount -o loop`` so that each can be undone on its own: whatever a step made is undone when a
later step fails, when the block raises, and on Ctrl-C. If the filesystem is busy at the end (a
process still has a file open in it) the mount is detached lazily (``umount -l``) and the loop
device is released with ``losetup -d``, which the kernel completes once the last user is gone.

Needs root, the ``loop`` and ``btrfs`` kernel modules, and ``mkfs.btrfs`` (btrfs-progs), which
is the one btrfs program the project runs: the driver itself only uses ioctls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphdrivers import hostcheck
from graphdrivers.errors import DriverError, NotSupported

log = logging.getLogger(__name__)

PREFIX = "graphdrivers-btrfs-"
IMAGE_NAME = "btrfs.img"
MOUNT_NAME = "mnt"
DEFAULT_SIZE = 2 * 1024**3
MIN_SIZE = 128 * 1024**2  # mkfs.btrfs refuses much smaller images
ATTACH_ATTEMPTS = 5


def check_loopback_host() -> None:
    """Raise NotSupported naming the first thing a loopback btrfs needs that is missing."""
    checks = [
        hostcheck.privilege_sys_admin(),
        hostcheck.kernel_filesystem("btrfs"),
        hostcheck.device(hostcheck.DEV_LOOP_CONTROL, "modprobe loop"),
        hostcheck.tool("mkfs.btrfs"),
        hostcheck.tool("losetup"),
        hostcheck.tool("mount"),
    ]
    for check in checks:
        if not check.ok:
            raise NotSupported(check.what, hint=check.hint, driver="btrfs")


def _run(*argv: str) -> str:
    """Run a set-up command; a failure becomes a DriverError carrying its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DriverError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def loopback_btrfs(size: int = DEFAULT_SIZE, *, parent: Path | None = None) -> Iterator[Path]:
    """Yield the mountpoint of a fresh btrfs of ``size`` bytes (sparse), removed afterwards.

    ``parent`` is where the work directory goes (default: the system's temporary directory).
    """
    check_loopback_host()
    if size < MIN_SIZE:
        raise DriverError(f"a loopback btrfs needs at least {MIN_SIZE} bytes, not {size}")
    workdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, workdir, ignore_errors=True)
        image = workdir / IMAGE_NAME
        with open(image, "wb") as f:
            f.truncate(size)
        _run("mkfs.btrfs", "--quiet", "--force", os.fspath(image))

        loopdev = attach(image)
        undo.callback(detach, loopdev)
        mountpoint = workdir / MOUNT_NAME
        mountpoint.mkdir()
        _run("mount", "-t", "btrfs", loopdev, os.fspath(mountpoint))
        undo.callback(unmount, mountpoint)
        log.debug("loopback btrfs of %d bytes on %s at %s", size, loopdev, mountpoint)
        yield mountpoint


def attach(image: Path) -> str:
    """``losetup --find --show``: the first free loop device, attached to ``image``.

    Finding a free device and attaching to it are two steps; another process attaching at the
    same moment can take the device in between (``EBUSY``), so a few attempts are made.
    """
    for attempt in range(1, ATTACH_ATTEMPTS + 1):
        try:
            return _run("losetup", "--find", "--show", os.fspath(image))
        except DriverError as exc:
            if attempt == ATTACH_ATTEMPTS:
                raise
            log.debug("attaching %s failed (%s); trying another loop device", image, exc)
    raise AssertionError("unreachable")


def unmount(mountpoint: Path) -> None:
    """Unmount; if busy, detach lazily so that the loop device can still be released."""
    done = subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True, text=True)
    if done.returncode == 0:
        return
    log.warning("umount %s failed (%s); detaching it lazily", mountpoint, done.stderr.strip())
    _run("umount", "-l", os.fspath(mountpoint))


def detach(loopdev: str) -> None:
    """Release the loop device (the kernel finishes once nothing uses it any more)."""
    _run("losetup", "--detach", loopdev)


def conformance_home() -> contextlib.AbstractContextManager[Path]:
    """The ``conformance_home`` hook: a loopback btrfs to hold the checks' homes."""
    return loopback_btrfs()
