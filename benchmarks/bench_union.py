"""Union filesystems side by side: kernel overlayfs, fuse-overlayfs and fusemount.

Run as root, on demand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_union.py [--rounds 3] [--quick]

Every measurement alternates the implementations round by round on identical, freshly built
layer dirs and fresh mounts, and prints the median seconds and the ratio of fusemount's speed to
fuse-overlayfs' (above 1.0 means fusemount is faster) next to the target. Workloads:

- sequential read of a 512 MiB file in a lower (``--quick``: 128 MiB);
- stat walk of a rootfs (debian-minbase's first layer, unpacked with tar) and reading every
  small file (< 64 KiB) of it;
- creating 5,000 files, copy-up of 200 lower files;
- 2,000 lookups of names in the bottom lower through 1, 100, 500 and 1,000 lowers (kernel
  overlayfs refuses more than 500) and the time to mount a 1,000-layer chain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

IMAGE = Path("/work/shared/images/debian-minbase")
FUSEMOUNT = [sys.executable, "-m", "fusemount.main"]
IMPLS = ("kernel", "fuse-overlayfs", "fusemount")
TARGETS = {
    "seq read": 1.0,
    "stat walk": 0.6,
    "small-file reads": 0.5,
    "create 5000": 0.6,
    "copy-up 200": 0.8,
}


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == str(path) for line in f)


@contextlib.contextmanager
def mount(
    impl: str, mnt: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None
) -> Iterator[float]:
    """Mount; yields the seconds the mount command took. Lowers are passed relative to their
    common parent (short option strings: kernel overlayfs cuts mount(2) data at 4 KiB)."""
    cwd = lowers[0].parent
    lower = ":".join(os.path.relpath(p, cwd) for p in lowers)
    opts = f"lowerdir={lower}"
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    mnt.mkdir(parents=True, exist_ok=True)
    if impl == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts + ",index=off", str(mnt)]
    elif impl == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", opts, str(mnt)]
    else:
        cmd = [*FUSEMOUNT, "-o", opts, str(mnt)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - start
    try:
        yield took
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


ROOT = Path(__file__).resolve().parent.parent


def unpack_rootfs(dest: Path) -> None:
    index = json.loads((IMAGE / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((IMAGE / "blobs" / "sha256" / digest).read_text())
    layer = manifest["layers"][0]["digest"].split(":")[1]
    dest.mkdir(parents=True)
    subprocess.run(
        ["tar", "-xzf", str(IMAGE / "blobs" / "sha256" / layer), "-C", str(dest)], check=True
    )


class Bench:
    def __init__(self, base: Path, rounds: int, quick: bool) -> None:
        self.base, self.rounds, self.quick = base, rounds, quick
        self.results: dict[str, dict[str, list[float]]] = {}

    def record(self, name: str, impl: str, seconds: float) -> None:
        self.results.setdefault(name, {}).setdefault(impl, []).append(seconds)

    def fresh(self, impl: str) -> tuple[Path, Path, Path]:
        d = Path(tempfile.mkdtemp(dir=self.base, prefix=impl + "-"))
        (d / "upper").mkdir()
        (d / "work").mkdir()
        return d / "upper", d / "work", d / "mnt"

    def alternate(
        self,
        name: str,
        lowers: list[Path],
        work: Callable[[Path], None],
        impls: tuple[str, ...] = IMPLS,
    ) -> None:
        for _ in range(self.rounds):
            for impl in impls:
                upper, wdir, mnt = self.fresh(impl)
                with mount(impl, mnt, lowers, upper, wdir):
                    start = time.perf_counter()
                    work(mnt)
                    self.record(name, impl, time.perf_counter() - start)
                shutil.rmtree(upper.parent)

    def run(self) -> None:
        data = self.base / "data"
        size = (128 if self.quick else 512) << 20
        big = data / "big" / "lower"
        big.mkdir(parents=True)
        with open(big / "file", "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        self.alternate("seq read", [big], lambda m: read_all(m / "file"))

        rootfs = data / "rootfs" / "lower"
        unpack_rootfs(rootfs)
        self.alternate("stat walk", [rootfs], stat_walk)
        self.alternate("small-file reads", [rootfs], read_small_files)

        empty = data / "empty" / "lower"
        empty.mkdir(parents=True)
        self.alternate("create 5000", [empty], create_files)

        files = data / "files" / "lower"
        files.mkdir(parents=True)
        for i in range(200):
            (files / f"f{i}").write_bytes(os.urandom(16384))
        self.alternate("copy-up 200", [files], copy_up)

        self.depth_runs(data / "deep")

    def depth_runs(self, deep: Path) -> None:
        layers = []
        for i in range(1000):
            layer = deep / f"{i}"
            layer.mkdir(parents=True)
            (layer / f"marker{i}").write_bytes(b"")
            layers.append(layer)
        for n in range(2000):
            (layers[0] / f"n{n}").write_bytes(b"x")
        for depth in (1, 100, 500, 1000):
            stack = list(reversed(layers[:depth]))  # bottom layer holds the names
            impls = IMPLS if depth <= 500 else ("fuse-overlayfs", "fusemount")
            for _ in range(self.rounds):
                for impl in impls:
                    upper, work, mnt = self.fresh(impl)
                    with mount(impl, mnt, stack, upper, work) as took:
                        start = time.perf_counter()
                        for n in range(2000):
                            os.stat(mnt / f"n{n}")
                        self.record(f"lookups depth {depth}", impl, time.perf_counter() - start)
                        if depth == 1000:
                            self.record("mount 1000 layers", impl, took)
                    shutil.rmtree(upper.parent)

    def report(self) -> str:
        lines = [f"{'workload':24} " + " ".join(f"{i:>15}" for i in IMPLS) + "   ours/fo  target"]
        for name, by_impl in self.results.items():
            med = {impl: statistics.median(v) for impl, v in by_impl.items()}
            cells = " ".join(f"{med[i]:>14.4f}s" if i in med else f"{'-':>15}" for i in IMPLS)
            if "fusemount" not in med or "fuse-overlayfs" not in med:
                continue
            ratio = med["fuse-overlayfs"] / med["fusemount"]
            target = TARGETS.get(name)
            verdict = ""
            if target is not None:
                verdict = f"  >= {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
            lines.append(f"{name:24} {cells}   {ratio:6.2f}x{verdict}")
        ours = {n: statistics.median(v["fusemount"]) for n, v in self.results.items()}
        if "lookups depth 500" in ours and "lookups depth 1" in ours:
            r = ours["lookups depth 500"] / ours["lookups depth 1"]
            lines.append(f"fusemount depth 500 / depth 1: {r:.2f}x (target <= 1.5x)")
        if "mount 1000 layers" in ours:
            t = ours["mount 1000 layers"]
            lines.append(f"fusemount 1,000-layer mount: {t:.3f} s (target < 0.5 s)")
        return "\n".join(lines)


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


def create_files(root: Path) -> None:
    payload = b"x" * 100
    for i in range(5000):
        with open(root / f"c{i}", "wb") as f:
            f.write(payload)


def copy_up(root: Path) -> None:
    for i in range(200):
        with open(root / f"f{i}", "ab") as f:
            f.write(b"+")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 512 MiB")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_union: needs root (mount -t overlay)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="bench-union-", dir="/var/tmp"))
    try:
        bench = Bench(base, args.rounds, args.quick)
        try:
            bench.run()
        finally:
            print(bench.report())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
