"""Union filesystems side by side: kernel overlayfs, fuse-overlayfs and fusemount.

Run as root, on demand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_union.py [--rounds 3] [--dir /var/tmp]
    .venv/bin/python benchmarks/bench_union.py --quick     # small sizes, 1 round: a smoke run

Every measurement alternates the implementations round by round (the order rotates each
round) on the same layer dirs, each time with a fresh upper dir and a fresh mount, and prints
the median seconds of each and the ratio of fusemount's speed to fuse-overlayfs' (above 1.0
means fusemount is faster) next to the target. Workloads (``--quick`` sizes in brackets):

- ``seq read``: sequential read of a 512 MiB [16 MiB] file in a lower, 1 MiB reads;
- ``stat walk``: lstat of every entry of a rootfs (debian-minbase's first layer unpacked with
  tar [a generated tree of 300 files]); ``small-file reads``: the same walk, reading every
  regular file under 64 KiB;
- ``create N``: creating 5,000 [300] files of 100 bytes; ``copy-up N``: appending a byte to
  each of 200 [30] lower files of 16 KiB;
- ``lookups depth D``: lstat of 2,000 [300] distinct names that live in the bottom layer of
  a chain of D = 1, 100, 500 and 1,000 [1 and 20] one-file layers (kernel overlayfs refuses
  more than 500); ``mount D layers``: how long the mount command took for that chain (for
  fusemount this includes starting Python, which the 1-layer row shows on its own).

Targets (issue 3): speed ratios seq read >= 1.0, stat walk >= 0.6, small-file reads >= 0.5,
creates >= 0.6, copy-up >= 0.8; fusemount's lookups at depth 500 take <= 1.5x those at depth 1;
a 1,000-layer chain mounts in < 0.5 s. Layer dirs live on ``--dir`` (a disk by default) but are
written just before use, so reads come from the page cache: the figures measure the union
filesystems, not the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import ROOT, daemons_naming, machine, median, scratch, unmount, wait_gone

IMAGE = Path("/work/shared/images/debian-minbase")
FUSEMOUNT = [sys.executable, "-m", "fusemount.main"]
IMPLS = ("kernel", "fuse-overlayfs", "fusemount")
KERNEL_MAX_LOWERS = 500
SPEED_TARGETS = {  # workload kind -> fusemount speed / fuse-overlayfs speed, at least
    "seq read": 1.0,
    "stat walk": 0.6,
    "small-file reads": 0.5,
    "create": 0.6,
    "copy-up": 0.8,
}
DEPTH_TARGET = 1.5
DEPTH_TARGET_AT = 500
MOUNT_TARGET = 0.5
MOUNT_TARGET_AT = 1000


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: the issue's sizes, or small ones for a smoke run."""

    seq_mib: int
    image_rootfs: bool
    creates: int
    copyups: int
    depths: tuple[int, ...]
    lookups: int
    rounds: int


FULL = Sizes(512, True, 5000, 200, (1, 100, 500, 1000), 2000, 3)
QUICK = Sizes(16, False, 300, 30, (1, 20), 300, 1)


@contextlib.contextmanager
def mount(impl: str, mnt: Path, lowers: list[Path], upper: Path, work: Path) -> Iterator[float]:
    """Mount ``impl`` at ``mnt``; yields the seconds the mount command took.

    Lowers are passed relative to their common parent, which is the command's working dir:
    kernel overlayfs cuts mount(2) option data at 4 KiB, and 500 absolute paths pass that.
    Unmounts on the way out, also when the mount command itself was interrupted.
    """
    cwd = lowers[0].parent
    lower = ":".join(os.path.relpath(p, cwd) for p in lowers)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mnt.mkdir(parents=True, exist_ok=True)
    if impl == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts + ",index=off", str(mnt)]
    elif impl == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", opts, str(mnt)]
    else:
        cmd = [*FUSEMOUNT, "-o", f"{opts},pidfile={upper.parent / 'pid'}", str(mnt)]
    try:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
        yield time.perf_counter() - start
    finally:
        daemons = daemons_naming(mnt)
        unmount(mnt)
        wait_gone(daemons)


def unpack_rootfs(dest: Path) -> None:
    """debian-minbase's first layer, unpacked by GNU tar into ``dest``."""
    index = json.loads((IMAGE / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((IMAGE / "blobs" / "sha256" / digest).read_text())
    layer = manifest["layers"][0]["digest"].split(":")[1]
    dest.mkdir(parents=True)
    blob = IMAGE / "blobs" / "sha256" / layer
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(dest), "--numeric-owner"], check=True)


def generate_rootfs(dest: Path, files: int = 300) -> None:
    """A small rootfs-like tree (nested dirs, mostly small files, some symlinks)."""
    rng = random.Random(3)
    for i in range(files):
        d = dest / f"usr{i % 3}" / f"lib{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.choice((100, 2000, 30000, 100000))))
        if i % 10 == 0:
            (d / f"l{i}").symlink_to(f"f{i}")


class Bench:
    """Builds the layers, runs each workload on each implementation, keeps the timings."""

    def __init__(self, base: Path, sizes: Sizes, rounds: int) -> None:
        self.base, self.sizes, self.rounds = base, sizes, rounds
        self.results: dict[str, dict[str, list[float]]] = {}

    def record(self, name: str, impl: str, seconds: float) -> None:
        self.results.setdefault(name, {}).setdefault(impl, []).append(seconds)

    @contextlib.contextmanager
    def fresh_mount(self, impl: str, lowers: list[Path]) -> Iterator[tuple[Path, float]]:
        """A new upper and work dir, mounted over ``lowers``; removed afterwards."""
        d = Path(tempfile.mkdtemp(dir=self.base, prefix=impl + "-"))
        try:
            (d / "upper").mkdir()
            (d / "work").mkdir()
            with mount(impl, d / "mnt", lowers, d / "upper", d / "work") as took:
                yield d / "mnt", took
        finally:
            shutil.rmtree(d)

    def order(self, rnd: int, impls: tuple[str, ...]) -> tuple[str, ...]:
        return impls[rnd % len(impls) :] + impls[: rnd % len(impls)]

    def alternate(self, name: str, lowers: list[Path], work: Callable[[Path], None]) -> None:
        for rnd in range(self.rounds):
            for impl in self.order(rnd, IMPLS):
                with self.fresh_mount(impl, lowers) as (mnt, _):
                    start = time.perf_counter()
                    work(mnt)
                    self.record(name, impl, time.perf_counter() - start)
        self.progress(name)

    def progress(self, name: str) -> None:
        med = {i: median(v) for i, v in self.results[name].items()}
        cells = ", ".join(f"{i} {s:.3f} s" for i, s in med.items())
        print(f"  {name}: {cells}", flush=True)

    def run(self) -> None:
        data, sizes = self.base / "data", self.sizes
        big = data / "big" / "lower"
        big.mkdir(parents=True)
        with open(big / "file", "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(sizes.seq_mib):
                f.write(chunk)
        self.alternate("seq read", [big], lambda m: read_all(m / "file"))

        rootfs = data / "rootfs" / "lower"
        if sizes.image_rootfs:
            unpack_rootfs(rootfs)
        else:
            generate_rootfs(rootfs)
        self.alternate("stat walk", [rootfs], stat_walk)
        self.alternate("small-file reads", [rootfs], read_small_files)

        empty = data / "empty" / "lower"
        empty.mkdir(parents=True)
        n = sizes.creates
        self.alternate(f"create {n}", [empty], lambda m: create_files(m, n))

        files = data / "files" / "lower"
        files.mkdir(parents=True)
        for i in range(sizes.copyups):
            (files / f"f{i}").write_bytes(os.urandom(16384))
        n_up = sizes.copyups
        self.alternate(f"copy-up {n_up}", [files], lambda m: copy_up(m, n_up))

        self.depth_runs(data / "deep")

    def depth_runs(self, deep: Path) -> None:
        """Lookups and mount time through chains of one-file layers over a bottom layer."""
        sizes = self.sizes
        layers = []
        for i in range(max(sizes.depths)):
            layer = deep / f"{i}"
            layer.mkdir(parents=True)
            (layer / f"marker{i}").write_bytes(b"")
            layers.append(layer)
        for n in range(sizes.lookups):
            (layers[0] / f"n{n}").write_bytes(b"x")
        for depth in sizes.depths:
            stack = list(reversed(layers[:depth]))  # top first; the bottom holds the names
            impls = IMPLS if depth <= KERNEL_MAX_LOWERS else IMPLS[1:]
            for rnd in range(self.rounds):
                for impl in self.order(rnd, impls):
                    with self.fresh_mount(impl, stack) as (mnt, took):
                        start = time.perf_counter()
                        for n in range(sizes.lookups):
                            os.lstat(mnt / f"n{n}")
                        self.record(f"lookups depth {depth}", impl, time.perf_counter() - start)
                        self.record(f"mount {depth} layers", impl, took)
                        check_stack(mnt, depth)
            self.progress(f"lookups depth {depth}")
            self.progress(f"mount {depth} layers")

    def report(self) -> str:
        """The table of medians and ratios, then the targets that are not speed ratios."""
        head = f"{'workload':20}" + "".join(f"{i:>16}" for i in IMPLS)
        lines = [head + "  ours/fo  ours/kern  target"]
        for name, by_impl in self.results.items():
            if "fusemount" not in by_impl or "fuse-overlayfs" not in by_impl:
                continue
            med = {impl: median(v) for impl, v in by_impl.items()}
            cells = "".join(f"{med[i]:>15.4f}s" if i in med else f"{'-':>16}" for i in IMPLS)
            ratio = med["fuse-overlayfs"] / med["fusemount"]
            kern = f"{med['kernel'] / med['fusemount']:8.2f}x" if "kernel" in med else " " * 9
            target = next((t for k, t in SPEED_TARGETS.items() if name.startswith(k)), None)
            goal = ""
            if target is not None:
                goal = f"  >= {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
            lines.append(f"{name:20}{cells}  {ratio:6.2f}x {kern}{goal}")
        lines.append("(ratios are speed: fuse-overlayfs' or the kernel's time / fusemount's)")
        ours = {n: median(v["fusemount"]) for n, v in self.results.items() if "fusemount" in v}
        depths = [d for d in self.sizes.depths if f"lookups depth {d}" in ours]
        if len(depths) > 1:
            deep = DEPTH_TARGET_AT if DEPTH_TARGET_AT in depths else max(depths)
            r = ours[f"lookups depth {deep}"] / ours[f"lookups depth {depths[0]}"]
            lines.append(
                f"fusemount lookups depth {deep} / depth {depths[0]}: {r:.2f}x "
                f"(target <= {DEPTH_TARGET}x at depth {DEPTH_TARGET_AT}: "
                f"{verdict(r <= DEPTH_TARGET, deep == DEPTH_TARGET_AT)})"
            )
        chains = [d for d in self.sizes.depths if f"mount {d} layers" in ours]
        if chains:
            d = max(chains)
            t = ours[f"mount {d} layers"]
            lines.append(
                f"fusemount {d}-layer chain mount: {t:.3f} s (target < {MOUNT_TARGET} s at "
                f"{MOUNT_TARGET_AT} layers: {verdict(t < MOUNT_TARGET, d == MOUNT_TARGET_AT)})"
            )
        return "\n".join(lines)


def verdict(met: bool, at_target_size: bool) -> str:
    """'met' or 'MISSED', or why there is no verdict (a quick run's smaller sizes)."""
    if not at_target_size:
        return "not measured at that size"
    return "met" if met else "MISSED"


def check_stack(mnt: Path, depth: int) -> None:
    """Fail loudly if the mount does not show both ends of the chain (a cut option string)."""
    for name in ("marker0", f"marker{depth - 1}"):
        if not (mnt / name).exists():
            raise RuntimeError(f"{mnt}: {name} missing: the {depth}-layer stack is wrong")


def read_all(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def stat_walk(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))


def read_small_files(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o100000 and st.st_size < 65536:
                with open(path, "rb") as f:
                    f.read()


def create_files(root: Path, count: int) -> None:
    payload = b"x" * 100
    for i in range(count):
        with open(root / f"c{i}", "wb") as f:
            f.write(payload)


def copy_up(root: Path, count: int) -> None:
    for i in range(count):
        with open(root / f"f{i}", "ab") as f:
            f.write(b"+")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--dir", default="/var/tmp", help="where to make the scratch dir")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_union: needs root (mount -t overlay)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    with scratch("bench-union-", args.dir) as base:
        print(f"bench_union in {base}; {machine()}", flush=True)
        bench = Bench(base, sizes, args.rounds or sizes.rounds)
        try:
            bench.run()
        finally:
            print(bench.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
