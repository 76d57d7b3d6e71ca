"""Benchmark: a vfs layer's apply_diff and diff against GNU tar on the same layer, same run.

Run on demand, as root (pytest does not collect this file)::

    .venv/bin/python benchmarks/bench_archive.py             # 1 GiB layer, 3 rounds
    .venv/bin/python benchmarks/bench_archive.py --quick     # 16 MiB, 1 round: a smoke run

It builds a deterministic tree shaped like a root filesystem (many small files, some medium,
a few large ones, symlinks and hardlinks) in a base layer of a vfs driver, writes that layer's
tar with ``diff``, and then, alternating which side goes first in each round:

- apply: ``apply_diff`` of that tar into a new layer vs ``tar -xpf`` of it into a fresh dir;
- diff: ``diff`` of the base layer (against no parent: the whole tree) vs ``tar -cf`` of the
  layer's directory, both writing a file.

Our side runs in a child process that reports the time of the operation itself (interpreter
start and imports excluded; GNU tar's exec is included, a millisecond) and its own peak RSS
(``ru_maxrss``, imports included). It prints medians and ratios; the targets are a ratio of
at most 1.3 and a peak RSS under 100 MiB for a 1 GiB layer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import ROOT, machine, median, scratch

from graphdrivers.drivers.vfs import VfsDriver

DEFAULT_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
TARGET_RATIO = 1.3
TARGET_RSS_MIB = 100

CHILD = r"""
import json, resource, sys, time
from graphdrivers.drivers.vfs import VfsDriver
op, home, layer, path = sys.argv[1:5]
driver = VfsDriver(home)
start = time.perf_counter()
if op == "apply":
    with open(path, "rb") as f:
        size = driver.apply_diff(layer, None, f)
else:
    with open(path, "wb") as out, driver.diff(layer) as stream:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
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


def run_ours(op: str, home: Path, layer: str, path: Path) -> dict[str, float]:
    """Run ``op`` (apply or diff) in a child process; its seconds and peak RSS in KiB."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, op, str(home), layer, str(path)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def run_gnu(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def bench(work: Path, mib: int, rounds: int) -> None:
    home = work / "home"
    driver = VfsDriver(home)
    driver.create("base")
    with driver.mounted("base") as tree:
        files, total = build_tree(tree, mib)
    layer = work / "layer.tar"
    run_ours("diff", home, "base", layer)
    print(
        f"tree: {files} files, {total / 2**20:.0f} MiB; layer tar "
        f"{layer.stat().st_size / 2**20:.0f} MiB; in {work}; {machine()}"
    )

    times: dict[str, list[float]] = {k: [] for k in ("apply", "tar-x", "diff", "tar-c")}
    rss: dict[str, list[float]] = {"apply": [], "diff": []}
    for rnd in range(rounds):
        order = ["ours", "gnu"] if rnd % 2 == 0 else ["gnu", "ours"]
        for side in order:
            if side == "ours":
                r = run_ours("apply", home, f"applied{rnd}", layer)
                times["apply"].append(r["seconds"])
                rss["apply"].append(r["rss_kib"] / 1024)
                driver.remove(f"applied{rnd}")
            else:
                dst = work / "tar-x"
                dst.mkdir()
                times["tar-x"].append(run_gnu(["tar", "-xpf", str(layer), "-C", str(dst)]))
                subprocess.run(["rm", "-rf", str(dst)], check=True)
        for side in order:
            out = work / f"out-{side}.tar"
            if side == "ours":
                r = run_ours("diff", home, "base", out)
                times["diff"].append(r["seconds"])
                rss["diff"].append(r["rss_kib"] / 1024)
            else:
                src = driver.layer_path("base")
                times["tar-c"].append(run_gnu(["tar", "-cf", str(out), "-C", str(src), "."]))
            out.unlink()
        print(
            f"round {rnd + 1}: apply_diff {times['apply'][-1]:.3f} s, "
            f"tar -x {times['tar-x'][-1]:.3f} s, diff {times['diff'][-1]:.3f} s, "
            f"tar -c {times['tar-c'][-1]:.3f} s",
            flush=True,
        )

    med = {k: median(v) for k, v in times.items()}
    print(f"rounds: {rounds} (alternating order); medians in seconds")
    for ours, gnu, label in (("apply", "tar-x", "tar -x"), ("diff", "tar-c", "tar -c")):
        ratio = med[ours] / med[gnu]
        peak = max(rss[ours])
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(
            f"{ours:<5} {med[ours]:.3f}  GNU {label} {med[gnu]:.3f}  ratio {ratio:.2f}x "
            f"(target <= {TARGET_RATIO}x: {verdict})  peak RSS {peak:.0f} MiB "
            f"(target < {TARGET_RSS_MIB} MiB for a 1 GiB layer: "
            f"{'met' if peak < TARGET_RSS_MIB else 'MISSED'})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, help="tree size in MiB (default 1024; quick 16)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="work directory (default /dev/shm: tmpfs, so the figures measure our code and "
        "not the disk; pass a disk directory to include the disk)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_archive: needs root (tar -p and the layer's owners)", file=sys.stderr)
        return 2
    mib = args.mib or (16 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 3)
    with scratch("bench-archive-", args.dir) as work:
        bench(work, mib, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
