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
(``ru_maxrss``, imports included). It prints medians and ratios of wall time and of CPU
time (user + system: ours from ``getrusage`` around the operation, GNU tar's from ``wait4``),
the second being the steadier figure on a machine that others load at the same time. The
targets are a wall-time ratio of at most 1.3 and a peak RSS under 100 MiB for a 1 GiB layer.
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
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
if op == "apply":
    with open(path, "rb") as f:
        size = driver.apply_diff(layer, None, f)
else:
    with open(path, "wb") as out, driver.diff(layer) as stream:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"seconds": elapsed, "cpu": cpu, "rss_kib": after.ru_maxrss}))
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


def run_gnu(args: list[str]) -> dict[str, float]:
    """Run GNU tar; its wall seconds and CPU seconds (user + system, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, args)
    return {"seconds": elapsed, "cpu": usage.ru_utime + usage.ru_stime}


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

    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("apply", "tar-x", "diff", "tar-c")}
    for rnd in range(rounds):
        order = ["ours", "gnu"] if rnd % 2 == 0 else ["gnu", "ours"]
        for side in order:
            if side == "ours":
                runs["apply"].append(run_ours("apply", home, f"applied{rnd}", layer))
                driver.remove(f"applied{rnd}")
            else:
                dst = work / "tar-x"
                dst.mkdir()
                runs["tar-x"].append(run_gnu(["tar", "-xpf", str(layer), "-C", str(dst)]))
                subprocess.run(["rm", "-rf", str(dst)], check=True)
        for side in order:
            out = work / f"out-{side}.tar"
            if side == "ours":
                runs["diff"].append(run_ours("diff", home, "base", out))
            else:
                src = driver.layer_path("base")
                runs["tar-c"].append(run_gnu(["tar", "-cf", str(out), "-C", str(src), "."]))
            out.unlink()
        last = {k: f"{v[-1]['seconds']:.3f} s (cpu {v[-1]['cpu']:.3f})" for k, v in runs.items()}
        print(
            f"round {rnd + 1}: apply_diff {last['apply']}, tar -x {last['tar-x']}, "
            f"diff {last['diff']}, tar -c {last['tar-c']}",
            flush=True,
        )
    print(f"rounds: {rounds} (alternating order); medians in seconds")
    for ours, gnu in (("apply", "tar-x"), ("diff", "tar-c")):
        report(ours, gnu, runs[ours], runs[gnu])


def report(ours: str, gnu: str, mine: list[dict[str, float]], ref: list[dict[str, float]]) -> None:
    """One line: wall and CPU medians, their ratios, peak RSS, and the verdicts."""
    wall, ref_wall = median([r["seconds"] for r in mine]), median([r["seconds"] for r in ref])
    cpu, ref_cpu = median([r["cpu"] for r in mine]), median([r["cpu"] for r in ref])
    ratio = wall / ref_wall
    peak = max(r["rss_kib"] for r in mine) / 1024
    print(
        f"{ours:<5} {wall:.3f}  GNU tar {gnu[-2:]} {ref_wall:.3f}  ratio {ratio:.2f}x "
        f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'}); "
        f"cpu {cpu:.3f} vs {ref_cpu:.3f}, ratio {cpu / ref_cpu:.2f}x; peak RSS {peak:.0f} MiB "
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
