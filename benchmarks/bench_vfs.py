"""vfs create of a child layer against ``cp -a`` of the same tree, on the same filesystem.

Run on demand, as root: ``python benchmarks/bench_vfs.py [--rounds N] [--dir DIR] [--quick]``
(``--quick``: a generated tree of 2,000 files and 20 MiB, two rounds, a few seconds).

The tree is rootfs-like: the first layer of ``/work/shared/images/debian-minbase`` unpacked with
``tar`` (about 6,700 entries, 167 MB) when that image is there, plus a generated tree of small and
medium files (deterministic sizes and contents) that brings it to about 30,000 files and 300 MiB.
It is put into a base layer of a :class:`~graphdrivers.drivers.vfs.VfsDriver`; then each round
times, in alternating order, ``create(child, base)`` and ``cp -a`` of the base layer's directory
to a sibling directory. Before each timed step the page cache's dirty data is written out
(``sync``) so that one step's writeback is not charged to the next. It prints the median of each,
their ratio (the target is <= 1.0), the same for CPU time (user + system, ``cp`` counted
through ``RUSAGE_CHILDREN``: steadier than wall time when others load the machine) and the
peak RSS of this process. Copies are kept until the
end: ext4 makes inode allocation slower for a while after many deletes (it skips recently freed
inodes), which would charge one round's clean-up to the next round's copies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import machine, median, peak_rss_mib, scratch

from graphdrivers.drivers.vfs import VfsDriver
from graphdrivers.fsutil.fstype import filesystem_type

IMAGE = Path("/work/shared/images/debian-minbase")
TARGET_FILES = 30_000
TARGET_BYTES = 300 << 20
QUICK_FILES = 2_000
QUICK_BYTES = 20 << 20


def first_layer_blob(image: Path) -> Path | None:
    """The blob of the first layer of the image's first manifest, if the image is there."""
    try:
        index = json.loads((image / "index.json").read_text())
        digest = index["manifests"][0]["digest"]
        manifest = json.loads((image / "blobs" / digest.replace(":", "/")).read_text())
        layer = manifest["layers"][0]["digest"]
    except (OSError, KeyError, IndexError, ValueError):
        return None
    return image / "blobs" / layer.replace(":", "/")


def generate(root: Path, files: int, total: int) -> None:
    """Add ``files`` files of about ``total`` bytes in all under ``root/gen``, 100 per dir."""
    rng = random.Random(20261204)
    block = rng.randbytes(1 << 20)
    mean = max(1, total // max(files, 1))
    for i in range(files):
        d = root / "gen" / f"d{i // 2000:02d}" / f"s{(i // 100) % 20:02d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = min(len(block), int(rng.expovariate(1 / mean)))
        start = rng.randrange(len(block) - size + 1)
        (d / f"f{i:05d}.dat").write_bytes(block[start : start + size])


def build_tree(root: Path, quick: bool) -> None:
    """The image's first layer (unless ``quick``) topped up with generated files."""
    files, total = (QUICK_FILES, QUICK_BYTES) if quick else (TARGET_FILES, TARGET_BYTES)
    blob = None if quick else first_layer_blob(IMAGE)
    if blob is not None and blob.exists():
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(root), "--numeric-owner"], check=True)
    have_files = sum(len(f) for _, _, f in os.walk(root))
    have_bytes = int(
        subprocess.run(
            ["du", "-sb", str(root)], check=True, capture_output=True, text=True
        ).stdout.split()[0]
    )
    generate(root, max(0, files - have_files), max(0, total - have_bytes))


def cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(step: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds ``step()`` took, after writing out dirty pages so that no other
    step's writeback counts."""
    os.sync()
    cpu, start = cpu_seconds(), time.perf_counter()
    step()
    return time.perf_counter() - start, cpu_seconds() - cpu


def bench(work: Path, rounds: int, quick: bool) -> None:
    driver = VfsDriver(work / "home")
    driver.create("base")
    with driver.mounted("base") as base:
        build_tree(base, quick)
    files = sum(len(f) + len(d) for _, d, f in os.walk(driver.layer_path("base")))
    size = subprocess.run(
        ["du", "-sh", str(driver.layer_path("base"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    print(
        f"tree: {files} entries, {size}; filesystem {filesystem_type(work)}; "
        f"copy method {driver.copy_method}; {machine()}"
    )

    times: dict[str, list[tuple[float, float]]] = {"vfs": [], "cp": []}
    for i in range(rounds):
        copy = work / f"cp-copy{i}"

        def vfs_step(i: int = i) -> None:
            driver.create(f"child{i}", "base")

        def cp_step(copy: Path = copy) -> None:
            subprocess.run(["cp", "-a", str(driver.layer_path("base")), str(copy)], check=True)

        steps = [("vfs", vfs_step), ("cp", cp_step)]
        if i % 2:
            steps.reverse()
        for label, step in steps:
            times[label].append(timed(step))
        (vw, vc), (cw, cc) = times["vfs"][-1], times["cp"][-1]
        print(
            f"round {i + 1}: vfs create {vw:.3f} s (cpu {vc:.3f}), "
            f"cp -a {cw:.3f} s (cpu {cc:.3f})",
            flush=True,
        )

    vfs_med, cp_med = (median([w for w, _ in times[k]]) for k in ("vfs", "cp"))
    vfs_cpu, cp_cpu = (median([c for _, c in times[k]]) for k in ("vfs", "cp"))
    ratio = vfs_med / cp_med
    print(
        f"median: vfs create {vfs_med:.3f} s, cp -a {cp_med:.3f} s, "
        f"ratio {ratio:.2f}x (target <= 1.0x: {'met' if ratio <= 1.0 else 'MISSED'}); "
        f"cpu {vfs_cpu:.3f} vs {cp_cpu:.3f}, ratio {vfs_cpu / cp_cpu:.2f}x; "
        f"peak RSS {peak_rss_mib():.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 5; quick 2)")
    parser.add_argument("--quick", action="store_true", help="a small generated tree")
    parser.add_argument("--dir", default="/var/tmp", help="where to make the scratch home")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_vfs: needs root (the image's owners and devices)", file=sys.stderr)
        return 2
    with scratch("bench-vfs-", args.dir) as work:
        bench(work, args.rounds or (2 if args.quick else 5), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
