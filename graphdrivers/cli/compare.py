"""``graphdrivers compare``: run every backend this host supports over one layer stack.

For each driver (all registered ones, or ``--drivers a,b``) in a fresh temporary home:

1. open the driver; NotSupported makes the row ``not available: <missing thing>``;
2. **apply**: unpack the layer chain (the built-in workload of :mod:`graphdrivers.workload`,
   or ``--image DIR[:TAG]`` through :func:`graphdrivers.image.import_image`);
3. **create**: a writable child of the top layer;
4. **mount**: ``get`` of the child;
5. **read**: walk the mountpoint and read every regular file (time, bytes, files);
6. **diff**: the top layer's tar against its parent, drained (time, bytes);
7. **disk**: space the home uses: ``st_blocks * 512`` over the unique inodes under it, not
   descending into mountpoints (so a mounted layer is not counted twice);
8. **conformance** (unless ``--no-conformance``): the suite in a subprocess, its counts;
   once every driver is measured, ``--jobs`` suites at a time.

Each row also carries the driver's capabilities that shape the trade-off: how deep a stack
may be (``max depth``; ``-`` for no limit) and whether its diff is native.

Every layer, mount and home is removed at the end, also on failure or Ctrl-C. A driver module
may expose ``conformance_home()`` (see :mod:`graphdrivers.cli.conformance`) for where its
homes must live; compare uses it too.

Limitation: disk space counts each inode's blocks once but cannot see extents that btrfs or a
thin pool share between layers, so copy-on-write backends are over-counted when layers are
separate inodes (btrfs snapshots); the pool files of devicemapper are counted as allocated.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphdrivers.cli.common import (
    Progress,
    Subparsers,
    UsageError,
    driver_label,
    driver_options,
    print_json,
)
from graphdrivers.cli.conformance import home_root_for
from graphdrivers.driver import Driver
from graphdrivers.errors import DriverError, InvalidOption, NotSupported
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.registry import driver_names, open_driver

log = logging.getLogger(__name__)

CHILD_ID = "compare-child"
READ_CHUNK = 1 << 20
SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="measure every backend side by side",
        description="Run every available driver over the same layer stack "
        "and print times, sizes and conformance.",
    )
    p.add_argument("--image", metavar="DIR[:TAG]", help="an OCI image instead of the workload")
    p.add_argument("--drivers", metavar="A,B", help="comma-separated drivers (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-conformance", action="store_true", help="skip the conformance suite")
    p.add_argument(
        "--jobs",
        type=int,
        default=max(2, os.cpu_count() or 1),
        metavar="N",
        help="conformance suites run side by side, after all timings (default: CPUs, min 2)",
    )
    p.add_argument("--seed", type=int, default=None, help="workload seed (default: fixed)")
    p.add_argument("--files", type=int, default=None, help="files in the workload's base")
    p.set_defaults(func=run)


@dataclasses.dataclass
class Row:
    """One driver's measurements (seconds, bytes); None where a step did not run."""

    driver: str
    status: str = "ok"
    available: bool = True
    missing: str = ""
    hint: str = ""
    layers: int = 0
    max_depth: int | None = None
    native_diff: bool | None = None
    apply_s: float | None = None
    create_s: float | None = None
    mount_s: float | None = None
    read_s: float | None = None
    read_bytes: int | None = None
    read_files: int | None = None
    diff_s: float | None = None
    diff_bytes: int | None = None
    disk_bytes: int | None = None
    conformance: dict[str, int] | None = None


@dataclasses.dataclass
class Stack:
    """The layer chain every driver gets: ``apply(driver) -> layer ids``, base first."""

    description: str
    apply: Callable[[Driver, Progress], list[str]]
    expected_bytes: int | None
    expected_files: int | None
    layers: int


# --------------------------------------------------------------------------- the stacks


def workload_stack(seed: int | None, files: int | None, scratch: Path) -> Stack:
    """Write the built-in workload's tars under ``scratch`` once; every driver reads them."""
    from graphdrivers import workload

    wl = workload.build(
        seed if seed is not None else workload.DEFAULT_SEED,
        files if files is not None else workload.DEFAULT_FILES,
    )
    paths = []
    for layer_id, tar in zip(wl.layer_ids, wl.tars(), strict=True):
        path = scratch / f"{layer_id}.tar"
        path.write_bytes(tar)
        paths.append((layer_id, path))

    def apply(driver: Driver, progress: Progress) -> list[str]:
        parent: str | None = None
        for layer_id, path in paths:
            progress.advance(note=f"{driver.name}: apply {layer_id}")
            with open(path, "rb") as f:
                driver.apply_diff(layer_id, parent, f)
            parent = layer_id
        return [lid for lid, _ in paths]

    return Stack(
        f"workload seed {wl.seed}", apply, wl.total_file_bytes(), wl.file_count(), len(paths)
    )


def image_stack(source: str) -> Stack:
    from graphdrivers.cli.import_ import split_source
    from graphdrivers.image import import_image

    path, tag = split_source(source)
    if not os.path.exists(path):
        raise UsageError(f"--image {source!r}: {path} does not exist")

    def apply(driver: Driver, progress: Progress) -> list[str]:
        progress.advance(note=f"{driver.name}: import {os.path.basename(path)}")
        return [str(i) for i in import_image(driver, path, tag=tag)]

    return Stack(f"image {source}", apply, None, None, 1)


# --------------------------------------------------------------------------- measuring


def read_everything(root: Path) -> tuple[int, int]:
    """Read every regular file under ``root`` (symlinks not followed): (bytes, files)."""
    total = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue  # symlinks, FIFOs (opening one would block), devices
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(READ_CHUNK):
                    total += len(chunk)
            files += 1
    return total, files


def disk_usage(home: Path) -> int:
    """Allocated bytes of the unique inodes under ``home``, not descending into mountpoints."""
    real = Path(os.path.realpath(home))
    skip = {str(e.target) for e in mounts_under(real) if e.target != real}
    seen: set[tuple[int, int]] = set()
    st = os.lstat(real)
    seen.add((st.st_dev, st.st_ino))
    total = st.st_blocks * 512
    pending = [str(real)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.path in skip:
                    continue
                est = entry.stat(follow_symlinks=False)
                key = (est.st_dev, est.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += est.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return total


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def drain(stream: Any) -> int:
    total = 0
    with stream:
        while chunk := stream.read(READ_CHUNK):
            total += len(chunk)
    return total


# Options for the throwaway homes, under what the user gives: a thin pool sized for a test
# stack rather than the 100G sparse default, which warns on disks with less free space.
SCRATCH_OPTIONS = {"devicemapper": {"dm.loopdatasize": "16G"}}


def measure(name: str, stack: Stack, options: dict[str, str], progress: Progress) -> Row:
    """Run ``stack`` through driver ``name`` in a fresh home and fill one row."""
    row = Row(driver=name)
    with contextlib.ExitStack() as exits:
        try:
            root = exits.enter_context(home_root_for(name, None))
            home = Path(
                tempfile.mkdtemp(
                    prefix=f"graphdrivers-compare-{driver_label(name)}-",
                    dir=str(root) if root else None,
                )
            )
            exits.callback(remove_home, home)
            sized = {**SCRATCH_OPTIONS.get(name, {}), **options}
            driver = open_driver(name, home / "home", sized)
        except NotSupported as exc:
            return _unavailable(row, exc)
        except DriverError as exc:  # an unknown name, a bad option
            row.available = False
            row.status = f"failed: {exc}"
            return row
        exits.callback(tear_down, driver)

        try:
            _run_steps(driver, stack, row, progress)
            row.disk_bytes = disk_usage(driver.home)
        except NotSupported as exc:
            return _unavailable(row, exc)
        except Exception as exc:
            # One broken driver must not hide the others' results: record it, go on.
            log.debug("compare: %s failed", name, exc_info=True)
            detail = str(exc) if isinstance(exc, DriverError | OSError) else repr(exc)
            row.status = f"failed: {detail}"
    return row


def _unavailable(row: Row, exc: NotSupported) -> Row:
    row.available = False
    row.status = f"not available: {exc.missing}"
    row.missing, row.hint = exc.missing, exc.hint
    return row


def _run_steps(driver: Driver, stack: Stack, row: Row, progress: Progress) -> None:
    caps = driver.capabilities()
    row.max_depth, row.native_diff = caps.max_depth, caps.native_diff
    row.apply_s, ids = _timed(lambda: stack.apply(driver, progress))
    row.layers = len(ids)
    top = ids[-1]
    parent = ids[-2] if len(ids) > 1 else None

    progress.advance(note=f"{driver.name}: create")
    row.create_s, _ = _timed(lambda: driver.create(CHILD_ID, top, rw=True))
    progress.advance(note=f"{driver.name}: mount")
    row.mount_s, mountpoint = _timed(lambda: driver.get(CHILD_ID))
    try:
        progress.advance(note=f"{driver.name}: read")
        row.read_s, (row.read_bytes, row.read_files) = _timed(lambda: read_everything(mountpoint))
    finally:
        driver.put(CHILD_ID)

    progress.advance(note=f"{driver.name}: diff")
    row.diff_s, row.diff_bytes = _timed(lambda: drain(driver.diff(top, parent)))


def tear_down(driver: Driver) -> None:
    """Remove every layer (children first) and unmount everything; log, never raise."""
    for layer_id in driver.list_layers():
        try:
            driver.remove(layer_id)
        except (DriverError, OSError):
            log.warning(
                "compare: could not remove layer %s of %s", layer_id, driver.name, exc_info=True
            )
    try:
        driver.cleanup()
    except (DriverError, OSError):
        log.warning("compare: cleanup of %s failed", driver.name, exc_info=True)


def remove_home(home: Path) -> None:
    """Unmount whatever is still mounted under ``home`` (deepest first), then delete it."""
    for entry in mounts_under(home):
        log.warning("compare: %s left mounted; unmounting it", entry.target)
        subprocess.run(["umount", "-l", str(entry.target)], check=False, capture_output=True)
    try:
        remove_tree(home)
    except OSError:
        log.warning("compare: could not remove %s", home, exc_info=True)


# --------------------------------------------------------------------------- conformance


def run_conformance_all(names: list[str], jobs: int) -> dict[str, dict[str, int]]:
    """The suite on every driver of ``names``, ``jobs`` of them at a time.

    The timings are all taken before this runs, so running suites side by side distorts no
    figure; it pays because much of a suite's time is waiting on mounts and daemons, not CPU.
    """
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(names, pool.map(run_conformance, names), strict=True))


def run_conformance(name: str) -> dict[str, int]:
    """Run the suite on ``name`` in a subprocess; the summary counts and its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "graphdrivers",
        "conformance",
        name,
        "--",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    log.info("compare: running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "exit_code": proc.returncode}
    lines = [ln for ln in proc.stdout.splitlines() if SUMMARY_RE.search(ln) and " in " in ln]
    if lines:
        for number, word in SUMMARY_RE.findall(lines[-1]):
            key = "errors" if word.startswith("error") else word
            if key in counts:
                counts[key] += int(number)
    else:
        log.warning(
            "compare: no pytest summary from conformance of %s: %s",
            name,
            (proc.stderr or proc.stdout).strip()[-300:],
        )
    return counts


# --------------------------------------------------------------------------- output


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}MiB"


def _verdict(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "-"
    text = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["errors"]:
        text += f", {counts['errors']} errors"
    if counts["skipped"]:
        text += f", {counts['skipped']} skipped"
    return text


HEADERS = (
    "driver",
    "apply",
    "create",
    "mount",
    "read",
    "read size",
    "diff",
    "diff size",
    "disk",
    "max depth",
    "conformance",
)


def table(rows: list[Row]) -> list[str]:
    """The aligned text table; a row that did not run shows its status after the name."""
    cells: list[tuple[str, ...]] = []
    for r in rows:
        if r.status != "ok":
            cells.append((r.driver, r.status))
            continue
        cells.append(
            (
                r.driver,
                _seconds(r.apply_s),
                _seconds(r.create_s),
                _seconds(r.mount_s),
                _seconds(r.read_s),
                _mib(r.read_bytes),
                _seconds(r.diff_s),
                _mib(r.diff_bytes),
                _mib(r.disk_bytes),
                "-" if r.max_depth is None else str(r.max_depth),
                _verdict(r.conformance),
            )
        )
    full = [HEADERS, *[c for c in cells if len(c) == len(HEADERS)]]
    widths = [max(len(c[i]) for c in full) for i in range(len(HEADERS))]
    lines = []
    for c in [HEADERS, *cells]:
        if len(c) != len(HEADERS):
            lines.append(f"{c[0]:<{widths[0]}}  {c[1]}")
        else:
            lines.append("  ".join(f"{v:<{w}}" for v, w in zip(c, widths, strict=True)).rstrip())
    return lines


# --------------------------------------------------------------------------- the verb


def selected_drivers(arg: str | None) -> list[str]:
    if not arg:
        return driver_names()
    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names:
        raise UsageError("--drivers needs at least one driver name")
    unknown = [n for n in names if n not in driver_names() and ":" not in n]
    if unknown:
        raise InvalidOption(
            f"unknown driver(s) {', '.join(unknown)}: use {', '.join(driver_names())} "
            "or package.module:Factory"
        )
    return names


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="graphdrivers-compare-stack-"))
    try:
        yield path
    finally:
        remove_tree(path)


def run(args: argparse.Namespace) -> int:
    names = selected_drivers(args.drivers)
    options = driver_options(args)
    with scratch_dir() as scratch:
        stack = (
            image_stack(args.image)
            if args.image
            else workload_stack(args.seed, args.files, scratch)
        )
        progress = Progress("compare", total=len(names) * (stack.layers + 4))
        try:
            rows = [measure(name, stack, options, progress) for name in names]
        finally:
            progress.close()

    if not args.no_conformance:
        available = [row for row in rows if row.available]
        verdicts = run_conformance_all([row.driver for row in available], args.jobs)
        for row in available:
            row.conformance = verdicts[row.driver]

    if args.json:
        print_json(
            {
                "stack": {
                    "description": stack.description,
                    "layers": stack.layers,
                    "expected_bytes": stack.expected_bytes,
                    "expected_files": stack.expected_files,
                },
                "drivers": [dataclasses.asdict(r) for r in rows],
            }
        )
    else:
        print(
            f"stack: {stack.description}"
            + (
                f" ({stack.expected_files} files, {_mib(stack.expected_bytes)})"
                if stack.expected_bytes is not None
                else ""
            )
        )
        for line in table(rows):
            print(line)
    return 0
