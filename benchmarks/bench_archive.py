"""Benchmark: apply_layer and export_tree against GNU tar on the same tree, same run.

Run on demand (pytest does not collect this file)::

    .venv/bin/python benchmarks/bench_archive.py            # ~200 MiB tree, 5 rounds
    .venv/bin/python benchmarks/bench_archive.py --mib 1024 --rounds 3

It builds a deterministic tree shaped like a root filesystem (many small files, some medium,
a few large ones, symlinks and hardlinks), writes its layer tar with ``export_tree``, and then,
alternating which side goes first in each round:

- apply: ``apply_layer`` of that tar vs ``tar -xpf`` of the same tar, into fresh directories;
- export: ``export_tree`` of the tree vs ``tar -cf`` of it, both writing a file.

Our side runs in a child process that reports the time of the operation itself (not the
interpreter start) and its peak RSS (``ru_maxrss``). Medians and ratios are printed; the
targets are a ratio of at most 1.3 and a peak RSS under 100 MiB for a 1 GiB layer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else None

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from graphdrivers.archive import apply_layer, export_tree
op, a, b = sys.argv[1:4]
start = time.perf_counter()
if op == "apply":
    with open(b, "rb") as f:
        size = apply_layer(Path(a), f)
else:
    with open(b, "wb") as f:
        for chunk in export_tree(Path(a)):
            f.write(chunk)
elapsed = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "rss_kib": rss}))
"""


def build_tree(root: Path, mib: int, seed: int = 7) -> tuple[int, int]:
    """A rootfs-like tree of about ``mib`` MiB; returns (files, bytes)."""
    rng = random.Random(seed)
    scale = mib / 200
    kinds = [  # (count, min size, max size)
        (int(6000 * scale), 200, 16 << 10),
        (int(500 * scale), 64 << 10, 512 << 10),
        (max(1, int(6 * scale)), 8 << 20, 12 << 20),
    ]
    dirs = [
        root / f"usr{i}" / f"lib{j}" / f"pkg{k}"
        for i in range(3)
        for j in range(6)
        for k in range(8)
    ]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    block = rng.randbytes(16 << 20)
    files = total = 0
    for count, low, high in kinds:
        for n in range(count):
            size = rng.randint(low, high)
            offset = rng.randint(0, len(block) - size)
            path = dirs[rng.randrange(len(dirs))] / f"f{files}-{n}.bin"
            path.write_bytes(block[offset : offset + size])
            files += 1
            total += size
            if n % 50 == 0:
                os.symlink(path.name, path.with_suffix(".link"))
            if n % 97 == 0:
                os.link(path, path.with_suffix(".hard"))
    return files, total


def run_ours(op: str, a: Path, b: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, op, str(a), str(b)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def run_gnu(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="tree size in MiB (default 200)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="work directory (default /dev/shm: tmpfs, so the figures measure our code and "
        "not the disk; pass a disk directory to include the disk)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=args.dir))
    try:
        tree = work / "tree"
        tree.mkdir()
        files, total = build_tree(tree, args.mib)
        layer = work / "layer.tar"
        run_ours("export", tree, layer)
        print(
            f"tree: {files} files, {total / 2**20:.0f} MiB; layer tar "
            f"{layer.stat().st_size / 2**20:.0f} MiB; {os.cpu_count()} cores; in {work}; "
            f"load average {os.getloadavg()[0]:.1f}"
        )

        times: dict[str, list[float]] = {k: [] for k in ("apply", "tar-x", "export", "tar-c")}
        rss: dict[str, list[float]] = {"apply": [], "export": []}
        for rnd in range(args.rounds):
            order = ["ours", "gnu"] if rnd % 2 == 0 else ["gnu", "ours"]
            for side in order:
                dst = work / f"dst-{side}"
                dst.mkdir()
                if side == "ours":
                    r = run_ours("apply", dst, layer)
                    times["apply"].append(r["seconds"])
                    rss["apply"].append(r["rss_kib"] / 1024)
                else:
                    times["tar-x"].append(run_gnu(["tar", "-xpf", str(layer), "-C", str(dst)]))
                shutil.rmtree(dst)
            for side in order:
                out = work / f"out-{side}.tar"
                if side == "ours":
                    r = run_ours("export", tree, out)
                    times["export"].append(r["seconds"])
                    rss["export"].append(r["rss_kib"] / 1024)
                else:
                    times["tar-c"].append(run_gnu(["tar", "-cf", str(out), "-C", str(tree), "."]))
                out.unlink()

        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"rounds: {args.rounds} (alternating order); medians in seconds")
        print(
            f"apply_layer {med['apply']:.3f}  GNU tar -x {med['tar-x']:.3f}  "
            f"ratio {med['apply'] / med['tar-x']:.2f}  peak RSS {max(rss['apply']):.0f} MiB"
        )
        print(
            f"export_tree {med['export']:.3f}  GNU tar -c {med['tar-c']:.3f}  "
            f"ratio {med['export'] / med['tar-c']:.2f}  peak RSS {max(rss['export']):.0f} MiB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
