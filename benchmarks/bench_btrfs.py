"""btrfs snapshot creation: O(1) in the parent's size, against vfs copying the same parent.

Run on demand, as root: ``python benchmarks/bench_btrfs.py [--children N] [--files N]``.

On fresh loopback filesystems (one per driver, so each one's space is its own):

1. **btrfs, size**: two parents, one of ``--small`` files (1,000) and one of ``--files``
   (30,000), small files of 200 B to 8 KiB in 100-file directories. Each of ``--rounds`` rounds
   creates one child of each (alternating which goes first) and times ``create``; the median
   times and their ratio (large/small) are printed, the target being <= 1.2x (O(1)). A create
   is dominated by the transaction commit of the snapshot (a disk flush), which varies from
   round to round by a few milliseconds whatever the parent: hence many rounds and medians.
2. **vfs**: the same 30,000-file parent in a vfs home, on btrfs (where vfs copies with
   reflinks) and on ext4 (full copies), ``--children`` children each, timed the same way.
3. **changes**: 20 edits (10 files rewritten, 5 added, 5 deleted) in fresh children of each
   parent, then ``changes(child, parent)`` timed with the generation-based method and with the
   naive walk (``btrfs.diff=naive``), each on its own child, and the generation-based method
   once more on the child the naive walk read; the lists must be equal.
4. **disk**: the filesystem's used bytes (statvfs, after a sync) before and after
   ``--children`` more children of the large parent, for btrfs and for both vfs homes.

Before each timed create, dirty data is written out (``sync``) so one step's writeback is not
charged to the next. The loopback images are sparse files in ``--dir`` and are removed at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphdrivers.driver import Driver
from graphdrivers.drivers.btrfs.driver import BtrfsDriver
from graphdrivers.drivers.btrfs.loopback import loopback_btrfs
from graphdrivers.drivers.vfs import VfsDriver

MiB = 1024**2
GiB = 1024**3


def generate(root: Path, files: int, seed: int) -> None:
    """``files`` small files (200 B - 8 KiB) in directories of 100, deterministic."""
    rng = random.Random(seed)
    block = rng.randbytes(1 << 16)
    for i in range(files):
        d = root / f"d{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir()
        size = rng.randrange(200, 8192)
        start = rng.randrange(len(block) - size)
        (d / f"f{i:05d}").write_bytes(block[start : start + size])


def timed(step: Callable[[], object]) -> float:
    os.sync()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def loopback_ext4(size: int, parent: str) -> Iterator[Path]:
    """A sparse ext4 image mounted through a loop device, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="bench-ext4-", dir=parent))
    image, mnt = work / "ext4.img", work / "mnt"
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)


def make_parent(driver: Driver, layer_id: str, files: int) -> None:
    driver.create(layer_id)
    with driver.mounted(layer_id) as root:
        generate(Path(root), files, seed=files)


def create(driver: Driver, layer_id: str, parent: str) -> None:
    driver.create(layer_id, parent)


def remove_all(driver: Driver) -> None:
    for layer in driver.list_layers():
        driver.remove(layer)
    driver.cleanup()


def bench_btrfs(args: argparse.Namespace, out: dict[str, object]) -> None:
    with loopback_btrfs(8 * GiB, parent=Path(args.dir)) as mnt:
        driver = BtrfsDriver(mnt / "home")
        empty = used_bytes(mnt)
        make_parent(driver, "small", args.small)
        make_parent(driver, "large", args.files)
        parents = used_bytes(mnt)
        small: list[float] = []
        large: list[float] = []
        for i in range(args.rounds):
            steps = [(small, "small"), (large, "large")]
            for times, parent in steps if i % 2 == 0 else steps[::-1]:
                times.append(timed(functools.partial(create, driver, f"{parent}-{i}", parent)))
        naive = BtrfsDriver(mnt / "home", {"btrfs.diff": "naive"})
        out["changes"] = {
            p: bench_changes(driver, naive, p, args.rounds) for p in ("small", "large")
        }
        before = used_bytes(mnt)
        for i in range(args.children):
            driver.create(f"disk-{i}", "large")
        children = used_bytes(mnt)
        out["btrfs"] = {
            "create_small_s": statistics.median(small),
            "create_large_s": statistics.median(large),
            "ratio": statistics.median(large) / statistics.median(small),
            "parents_bytes": parents - empty,
            "children_bytes": children - before,
            "children_per_parent": args.children,
            "rounds": args.rounds,
        }
        remove_all(driver)


def edit(root: Path) -> None:
    """20 changes: 10 files rewritten, 5 added, 5 deleted (present in both parents)."""
    for i in range(10):
        (root / "d0000" / f"f{i:05d}").write_bytes(b"edited %d" % i)
    for i in range(5):
        (root / "d0001" / f"new{i}").write_bytes(b"added")
        (root / "d0001" / f"f{100 + i:05d}").unlink()


def bench_changes(
    fast: BtrfsDriver, naive: BtrfsDriver, parent: str, rounds: int
) -> dict[str, float | int]:
    """``changes(child, parent)`` after :func:`edit` in fresh children: generation-based,
    naive, and generation-based again on the child the naive walk has just read (the walk
    moved its directories' atimes, which rewrites their tree leaves)."""
    fast_times: list[float] = []
    naive_times: list[float] = []
    after_walk: list[float] = []
    for i in range(max(3, rounds // 6)):
        for kind in ("fast", "naive"):
            fast.create(f"{parent}-{kind}{i}", parent)
            edit(fast.layer_path(f"{parent}-{kind}{i}"))
        fast_times.append(timed(functools.partial(fast.changes, f"{parent}-fast{i}", parent)))
        naive_times.append(timed(functools.partial(naive.changes, f"{parent}-naive{i}", parent)))
        after_walk.append(timed(functools.partial(fast.changes, f"{parent}-naive{i}", parent)))
    found = fast.changes(f"{parent}-fast0", parent)
    assert found == naive.changes(f"{parent}-fast0", parent), "the two methods differ"
    return {
        "changes": len(found),
        "generation_s": statistics.median(fast_times),
        "naive_s": statistics.median(naive_times),
        "generation_after_walk_s": statistics.median(after_walk),
    }


def bench_vfs(args: argparse.Namespace, fs: str, out: dict[str, object]) -> None:
    maker = (
        loopback_btrfs(8 * GiB, parent=Path(args.dir))
        if fs == "btrfs"
        else loopback_ext4(8 * GiB, args.dir)
    )
    with maker as mnt:
        driver = VfsDriver(mnt / "home")
        empty = used_bytes(mnt)
        make_parent(driver, "large", args.files)
        parent = used_bytes(mnt)
        times = [
            timed(functools.partial(create, driver, f"large-{i}", "large"))
            for i in range(args.children)
        ]
        children = used_bytes(mnt)
        out[f"vfs-{fs}"] = {
            "create_large_s": statistics.median(times),
            "copy_method": str(driver.last_copy_method),
            "parents_bytes": parent - empty,
            "children_bytes": children - parent,
            "children_per_parent": args.children,
        }
        remove_all(driver)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--files", type=int, default=30_000, help="files in the large parent")
    parser.add_argument("--small", type=int, default=1_000, help="files in the small parent")
    parser.add_argument("--children", type=int, default=10, help="children for the disk figure")
    parser.add_argument("--rounds", type=int, default=31, help="timed btrfs creates per parent")
    parser.add_argument("--dir", default="/var/tmp", help="where the loopback images go")
    parser.add_argument("--vfs", default="btrfs,ext4", help="filesystems to run vfs on")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_btrfs: needs root (loop devices, mounts, ioctls)", file=sys.stderr)
        return 2

    out: dict[str, object] = {"kernel": os.uname().release}
    bench_btrfs(args, out)
    for fs in [f for f in args.vfs.split(",") if f]:
        bench_vfs(args, fs, out)
    print(json.dumps(out, indent=1))

    b = out["btrfs"]
    assert isinstance(b, dict)
    print(
        f"btrfs create: {b['create_small_s'] * 1000:.1f} ms ({args.small} files) vs "
        f"{b['create_large_s'] * 1000:.1f} ms ({args.files} files): {b['ratio']:.2f}x "
        f"(target <= 1.2x: {'met' if b['ratio'] <= 1.2 else 'MISSED'})"
    )
    changes = out["changes"]
    assert isinstance(changes, dict)
    for parent, files in (("small", args.small), ("large", args.files)):
        c = changes[parent]
        print(
            f"changes ({c['changes']} entries) of a child of the {files}-file parent: "
            f"generation {c['generation_s'] * 1000:.1f} ms, naive {c['naive_s'] * 1000:.1f} ms, "
            f"generation after a naive walk {c['generation_after_walk_s'] * 1000:.1f} ms"
        )
    for key in [k for k in out if k.startswith("vfs-")]:
        v = out[key]
        assert isinstance(v, dict)
        print(
            f"{key} create: {v['create_large_s']:.2f} s "
            f"({v['create_large_s'] / b['create_large_s']:.0f}x btrfs); "
            f"{args.children} children take {v['children_bytes'] / MiB:.1f} MiB vs btrfs "
            f"{b['children_bytes'] / MiB:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
