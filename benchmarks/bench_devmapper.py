"""The userspace thin pool: O(1) snapshots, and ext4 on a thin device against a plain loop file.

Run on demand, as root: ``python benchmarks/bench_devmapper.py [--rounds N] [--dir DIR]
[--quick]``. Two measurements, each against a reference taken in the same run, alternating:

1. **create_snap** of an origin with 10 mapped blocks against one with 100,000. The pool is
   made by ``thin_restore`` from XML, so the big origin costs no data writes (its data blocks
   are never read: a snapshot only shares the origin's mapping tree). Each round snapshots one
   origin then the other, in alternating order, through :meth:`ThinPool.create_snap` (which
   commits, as the kernel's message does). Target: big / small <= 1.2x.
2. **ext4 write and read** of a 256 MiB file on a layer of the devicemapper driver (userspace
   backend: ext4 -> loop -> FUSE -> Python pool -> sparse files) against ext4 on a loop device
   over a plain sparse file (``losetup --direct-io=on``, as the driver attaches its devices).
   Each round uses a fresh layer and a fresh loop file, so that every write allocates. The
   write is timed to its ``fsync``; before the read, the filesystem is unmounted and mounted
   again and the backing files' pages are dropped (``POSIX_FADV_DONTNEED``), so that the read
   comes from the files, not from a cache. Target: thin / plain >= 0.3x (throughput).

It prints the median of each and the ratios; ``--quick`` shrinks everything to a smoke test
whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphdrivers.drivers.devmapper.driver import DevmapperDriver
from graphdrivers.thinpool import ThinPool

MIB = 1 << 20
SMALL_ORIGIN, BIG_ORIGIN = 1, 2
BLOCK_SECTORS = 128
WRITE_CHUNK = 1 * MIB


# ------------------------------------------------------------------ create_snap


def restore_pool(directory: Path, small: int, big: int) -> tuple[Path, Path]:
    """A pool with an origin of ``small`` and one of ``big`` mapped blocks, by thin_restore."""
    meta, data = directory / "metadata", directory / "data"
    nr_data = small + big + 1024
    xml = directory / "pool.xml"
    xml.write_text(
        f'<superblock uuid="" time="0" transaction="0" flags="0" version="2" '
        f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{nr_data}">\n'
        + "".join(
            f'  <device dev_id="{dev}" mapped_blocks="{n}" transaction="0" creation_time="0" '
            f'snap_time="0">\n'
            f'    <range_mapping origin_begin="0" data_begin="{start}" length="{n}" '
            f'time="0"/>\n  </device>\n'
            for dev, n, start in ((SMALL_ORIGIN, small, 0), (BIG_ORIGIN, big, small))
        )
        + "</superblock>\n"
    )
    with open(meta, "wb") as f:
        f.truncate(64 * MIB)
    with open(data, "wb") as f:
        f.truncate(nr_data * BLOCK_SECTORS * 512)
    subprocess.run(["thin_restore", "-i", str(xml), "-o", str(meta)], check=True)
    return meta, data


def bench_create_snap(directory: Path, rounds: int, big: int) -> tuple[float, float]:
    """Median seconds of create_snap on the small origin and on the big one."""
    meta, data = restore_pool(directory, 10, big)
    times: dict[int, list[float]] = {SMALL_ORIGIN: [], BIG_ORIGIN: []}
    with ThinPool.open(meta, data) as pool:
        assert len(pool.mappings(BIG_ORIGIN)) == big
        next_id = 100
        for r in range(rounds):
            order = (SMALL_ORIGIN, BIG_ORIGIN) if r % 2 == 0 else (BIG_ORIGIN, SMALL_ORIGIN)
            for origin in order:
                start = time.perf_counter()
                pool.create_snap(next_id, origin)
                times[origin].append(time.perf_counter() - start)
                next_id += 1
    subprocess.run(["thin_check", "-q", str(meta)], check=True)
    return statistics.median(times[SMALL_ORIGIN]), statistics.median(times[BIG_ORIGIN])


# ------------------------------------------------------------------ ext4 throughput


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_file(path: Path, size: int) -> float:
    chunk = os.urandom(WRITE_CHUNK)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // WRITE_CHUNK):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_file(path: Path) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, WRITE_CHUNK):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - start


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def plain_loop_ext4(directory: Path, size: int) -> Iterator[tuple[Path, Path]]:
    """ext4 on a loop device over a sparse file: (mountpoint, backing file)."""
    image, mnt = directory / "plain.img", directory / "plain-mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(image))
    loop = run("losetup", "-f", "--show", "--direct-io=on", str(image))
    mnt.mkdir()
    try:
        run("mount", "-t", "ext4", loop, str(mnt))
        try:
            yield mnt, image
        finally:
            run("umount", str(mnt))
    finally:
        run("losetup", "-d", loop)
        mnt.rmdir()
        image.unlink()


def remount(mnt: Path) -> None:
    """Unmount and mount again: the filesystem's page cache of the file is gone."""
    source = run("findmnt", "-n", "-o", "SOURCE", str(mnt))
    run("umount", str(mnt))
    run("mount", "-t", "ext4", source, str(mnt))


def bench_plain(directory: Path, size: int) -> tuple[float, float]:
    with plain_loop_ext4(directory, 2 * size + 256 * MIB) as (mnt, image):
        wrote = write_file(mnt / "f", size)
        remount(mnt)
        drop_file_cache(image)
        return wrote, read_file(mnt / "f")


def bench_thin(
    driver: DevmapperDriver, layer: str, data_file: Path, size: int
) -> tuple[float, float]:
    driver.create(layer, "base")
    try:
        with driver.mounted(layer) as root:
            wrote = write_file(root / "f", size)
        drop_file_cache(data_file)
        with driver.mounted(layer) as root:  # a fresh mount: nothing cached above the pool
            return wrote, read_file(root / "f")
    finally:
        driver.remove(layer)


def bench_ext4(directory: Path, rounds: int, size: int) -> dict[str, list[float]]:
    home = directory / "dm-home"
    options = {
        "dm.backend": "userspace",
        "dm.basesize": str(2 * size + 256 * MIB),
        "dm.loopdatasize": str(4 * size + 512 * MIB),
        "dm.loopmetadatasize": "64M",
    }
    times: dict[str, list[float]] = {k: [] for k in ("plain w", "plain r", "thin w", "thin r")}
    driver = DevmapperDriver(home, options)
    try:
        driver.create("base")
        data_file = home / "devicemapper" / "data"
        for r in range(rounds):
            layer = f"round{r}"
            steps: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                ("plain", lambda: bench_plain(directory, size)),
                ("thin", lambda: bench_thin(driver, layer, data_file, size)),  # noqa: B023
            ]
            for name, step in steps if r % 2 == 0 else steps[::-1]:
                wrote, read = step()
                times[f"{name} w"].append(wrote)
                times[f"{name} r"].append(read)
        driver.remove("base")
    finally:
        driver.cleanup()
    return times


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch parent (default /var/tmp)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    big = 2_000 if args.quick else 100_000
    size = 16 * MIB if args.quick else 256 * MIB
    for tool in ("thin_restore", "thin_check", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_devmapper needs {tool}")

    scratch = Path(tempfile.mkdtemp(prefix="bench-devmapper-", dir=args.dir or "/var/tmp"))
    try:
        snap_dir = scratch / "snap"
        snap_dir.mkdir()
        small_s, big_s = bench_create_snap(snap_dir, 10 if args.quick else 60, big)
        print(
            f"create_snap: origin of 10 blocks {small_s * 1e3:.2f} ms, of {big:,} blocks "
            f"{big_s * 1e3:.2f} ms: ratio {big_s / small_s:.2f}x (target <= 1.2x)"
        )
        shutil.rmtree(snap_dir)

        times = bench_ext4(scratch, rounds, size)
        mib = size / MIB
        for what, label in (("w", "write"), ("r", "read")):
            plain = mib / statistics.median(times[f"plain {what}"])
            thin = mib / statistics.median(times[f"thin {what}"])
            print(
                f"ext4 {label} {mib:.0f} MiB: plain loop {plain:.0f} MiB/s, userspace thin "
                f"{thin:.0f} MiB/s: ratio {thin / plain:.2f}x (target >= 0.3x)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
