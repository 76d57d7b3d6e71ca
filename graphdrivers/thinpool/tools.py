"""The pool's metadata as thin-provisioning-tools see it, and checks against them.

``thin_check``, ``thin_dump`` and ``thin_ls`` (Debian package thin-provisioning-tools) read
the metadata the kernel writes; since the pool writes the same format, they are an outside
opinion on it. :func:`verify_pool` runs ``thin_check`` and our own recount (:mod:`.check`),
and compares every device's mappings as ``thin_dump`` reads them, and their number as
``thin_ls`` counts it, with the pool's own view; it returns the problems found, an empty list
when the pool is clean. Run it on committed metadata that no process is writing: a pool daemon
committing meanwhile can reuse blocks a reader is about to follow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from graphdrivers.thinpool.check import check_pool
from graphdrivers.thinpool.errors import ThinPoolError
from graphdrivers.thinpool.pool import ThinPool

THIN_TOOLS = ("thin_check", "thin_dump", "thin_ls", "thin_delta")
TOOLS_PACKAGE = "thin-provisioning-tools"

_DEVICE = re.compile(r'<device dev_id="(\d+)"')
_RANGE = re.compile(r'origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)"')
_SINGLE = re.compile(r'origin_block="(\d+)" data_block="(\d+)"')

Mappings = dict[int, dict[int, int]]


class ToolMissing(ThinPoolError):
    """A thin-provisioning-tools program is not installed."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} is not installed (Debian package {TOOLS_PACKAGE})")
    return path


def thin_check(metadata: Path) -> list[str]:
    """What ``thin_check`` says is wrong with the metadata (empty when it passes)."""
    run = subprocess.run([_tool("thin_check"), str(metadata)], capture_output=True, text=True)
    if run.returncode == 0:
        return []
    return [f"thin_check: {line}" for line in (run.stdout + run.stderr).splitlines() if line]


def thin_dump_mappings(metadata: Path) -> Mappings:
    """Device id -> {virtual block: data block}, as ``thin_dump`` reads the metadata."""
    run = subprocess.run(
        [_tool("thin_dump"), str(metadata)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise ThinPoolError(f"thin_dump {metadata} failed: {run.stderr.strip()}")
    devices: Mappings = {}
    current: dict[int, int] = {}
    for line in run.stdout.splitlines():
        if m := _DEVICE.search(line):
            current = devices.setdefault(int(m.group(1)), {})
        elif m := _RANGE.search(line):
            origin, data, length = map(int, m.groups())
            current.update({origin + i: data + i for i in range(length)})
        elif m := _SINGLE.search(line):
            current[int(m.group(1))] = int(m.group(2))
    return devices


def thin_ls_mapped(metadata: Path) -> dict[int, int]:
    """Device id -> number of mapped blocks, as ``thin_ls`` counts them."""
    run = subprocess.run(
        [_tool("thin_ls"), "--no-headers", "-o", "DEV,MAPPED_BLOCKS", str(metadata)],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise ThinPoolError(f"thin_ls {metadata} failed: {run.stderr.strip()}")
    return {int(dev): int(n) for dev, n in (line.split() for line in run.stdout.splitlines())}


def pool_mappings(pool: ThinPool) -> Mappings:
    """Device id -> {virtual block: data block}, as the pool itself reads its metadata."""
    return {dev: {v: b for v, b, _t in pool.mappings(dev)} for dev in pool.devices()}


def verify_pool(metadata: Path, data: Path) -> list[str]:
    """thin_check, our recount, thin_dump's mappings and thin_ls's counts against the pool."""
    problems = thin_check(metadata) + check_pool(metadata)
    if problems:
        return problems
    with ThinPool.open(metadata, data) as pool:
        ours = pool_mappings(pool)
    theirs = thin_dump_mappings(metadata)
    for dev in sorted(set(ours) | set(theirs)):
        if ours.get(dev) != theirs.get(dev):
            mine, dumped = ours.get(dev, {}), theirs.get(dev, {})
            differ = sorted(v for v in set(mine) | set(dumped) if mine.get(v) != dumped.get(v))
            problems.append(
                f"device {dev}: thin_dump and the pool disagree on {len(differ)} block(s), "
                f"first {differ[:5]}"
            )
    counted = {dev: len(blocks) for dev, blocks in ours.items()}
    listed = thin_ls_mapped(metadata)
    if listed != counted:
        problems.append(f"thin_ls counts mapped blocks {listed}, the pool {counted}")
    return problems
