"""The benchmarks in benchmarks/ still run: each in its quickest mode, as a smoke test.

The figures of a quick run mean nothing; what is checked is that every benchmark prints its
ratio lines and leaves nothing behind: no mount, no daemon, no scratch directory. One more test
stops the union benchmark with SIGTERM in the middle of its mounts and checks the same.
Scratch dirs go on /dev/shm so that a busy disk does not make these slow.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmarks need root"),
]


@pytest.fixture
def scratch_parent() -> Iterator[Path]:
    """An empty directory for the benchmark's scratch dir, on tmpfs when there is one."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    parent = Path(tempfile.mkdtemp(prefix="test-bench-", dir=shm))
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(path))]


def processes_naming(path: Path) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(path).encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def assert_nothing_left(parent: Path) -> None:
    assert mounts_under(parent) == []
    assert processes_naming(parent) == []
    assert list(parent.iterdir()) == []


def run_quick(script: str, parent: Path) -> str:
    run = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--dir", str(parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_bench_archive_quick(scratch_parent: Path) -> None:
    out = run_quick("bench_archive.py", scratch_parent)
    assert re.search(r"^apply .* ratio \d+\.\d\dx .*peak RSS \d+ MiB", out, re.M), out
    assert re.search(r"^diff .* ratio \d+\.\d\dx .*peak RSS \d+ MiB", out, re.M), out
    assert_nothing_left(scratch_parent)


def test_bench_vfs_quick(scratch_parent: Path) -> None:
    out = run_quick("bench_vfs.py", scratch_parent)
    assert re.search(r"^median: vfs create .* ratio \d+\.\d\dx .*peak RSS", out, re.M), out
    assert_nothing_left(scratch_parent)


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs missing")
def test_bench_union_quick(scratch_parent: Path) -> None:
    out = run_quick("bench_union.py", scratch_parent)
    for name in ("seq read", "stat walk", "small-file reads", "create", "copy-up"):
        assert re.search(rf"^{name}\b.* \d+\.\d\dx .*(met|MISSED)$", out, re.M), out
    assert re.search(r"^lookups depth 20\b.* \d+\.\d\dx", out, re.M), out
    assert re.search(r"^fusemount lookups depth 20 / depth 1: \d+\.\d\dx", out, re.M), out
    assert re.search(r"^fusemount 20-layer chain mount: \d+\.\d+ s", out, re.M), out
    assert_nothing_left(scratch_parent)


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs missing")
def test_bench_union_cleans_up_on_sigterm(scratch_parent: Path) -> None:
    """SIGTERM while the union benchmark mounts and unmounts: nothing stays behind."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "bench_union.py"), "--quick", "--dir", str(scratch_parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first workload is done: mounts come and go from now on
            if line.strip().startswith("seq read:"):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert_nothing_left(scratch_parent)
