"""The base device's filesystem, made on a scratch file and copied into the pool.

Running ``mkfs.ext4`` on the base thin device itself would send every block it writes through
the pool's daemon, and putting the layer root in it would need a mount. Instead ``mkfs.ext4
-d`` makes the filesystem, already holding the ``rootfs`` directory, on a sparse scratch file
next to the pool; then only the extents mkfs wrote (found with ``SEEK_DATA``/``SEEK_HOLE``) are
copied into the device, so the blocks mkfs never touched stay unmapped and read as zeros, as
they would on the device.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from graphdrivers.errors import MountError

log = logging.getLogger(__name__)

ROOTFS_DIR = "rootfs"
COPY_CHUNK = 1 << 20
MKFS_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"

Writer = Callable[[bytes, int], object]


def make_ext4_image(image: Path, size: int, extra_args: list[str]) -> None:
    """Write a sparse ``size``-byte ext4 image whose root holds an empty ``rootfs`` (0755, 0:0)."""
    with open(image, "wb") as f:
        f.truncate(size)
    with tempfile.TemporaryDirectory(prefix=".base-src-", dir=image.parent) as src:
        rootfs = Path(src) / ROOTFS_DIR
        rootfs.mkdir()
        os.chown(rootfs, 0, 0)
        os.chmod(rootfs, 0o755)
        args = ["mkfs.ext4", "-q", "-F", "-E", MKFS_EXTENDED, *extra_args, "-d", src, str(image)]
        run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        raise MountError(f"making the base filesystem: {' '.join(args)}: {run.stderr.strip()}")


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every stretch of a sparse file that holds data."""
    end = os.fstat(fd).st_size
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, stop - start
        offset = stop


def copy_extents(image: Path, write: Writer) -> int:
    """Hand every data extent of ``image`` to ``write(data, offset)``; returns bytes copied."""
    copied = 0
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in data_extents(fd):
            for offset in range(start, start + length, COPY_CHUNK):
                chunk = os.pread(fd, min(COPY_CHUNK, start + length - offset), offset)
                write(chunk, offset)
                copied += len(chunk)
    finally:
        os.close(fd)
    log.debug("copied %d bytes of %s", copied, image)
    return copied
