"""What every benchmark here shares: a scratch directory that is always cleaned up, mounts
and daemons included, and a few measuring helpers.

The benchmarks are scripts run on demand; they import this module from their own directory.
Cleaning up is the part that must not be skipped: a benchmark stopped by Ctrl-C, SIGTERM or
a failure still unmounts what it mounted (deepest first), stops the FUSE daemons it started
(found by their command line naming the scratch directory, which is unique to this run) and
only then removes the directory, never deleting through a mount that is still there.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so ``finally`` blocks clean up."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space) decoded."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [_unescape(line.split()[4]) for line in f]
    found = {Path(p) for p in points if p == str(path) or p.startswith(prefix)}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mounted(path: Path) -> bool:
    return path in mounts_under(path)


def unmount(path: Path) -> None:
    """Unmount ``path`` (all stacked mounts on it); lazily if a plain umount fails."""
    for _ in range(8):
        if not is_mounted(path):
            return
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def daemons_naming(path: Path) -> list[int]:
    """Pids of processes (not this one) whose command line names a path under ``path``."""
    needle = str(path).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if needle in f.read():
                pids.append(int(entry))
    return pids


def stop_daemons(path: Path, grace: float = 3.0) -> None:
    """SIGTERM the processes naming ``path``, then SIGKILL those still alive after ``grace``."""
    pids = daemons_naming(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_gone(pids, grace)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait for ``pids`` to exit (a daemon finishing after its unmount); SIGKILL stragglers.

    Waiting matters for the figures too: a daemon still tearing down would share the CPUs
    with the next measurement.
    """
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if pids:
            time.sleep(0.01)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def release(path: Path) -> list[Path]:
    """Unmount everything under ``path`` and stop its daemons; returns what is still mounted."""
    for point in mounts_under(path):
        unmount(point)
    stop_daemons(path)
    for point in mounts_under(path):  # a daemon that died mid-unmount leaves a dead mount
        unmount(point)
    return mounts_under(path)


@contextlib.contextmanager
def scratch(prefix: str, parent: Path | str | None) -> Iterator[Path]:
    """A fresh directory for one run, released and removed however the run ends."""
    stop_on_signals()
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield base
    finally:
        left = release(base)
        if left:
            print(f"benchlib: still mounted, not removing {base}: {left}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def timed(step: Callable[[], object]) -> float:
    """Seconds that ``step()`` took (wall clock)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """One line naming the machine and its load, printed at the top of every report."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, kernel {platform.release()}, load average {load}"
