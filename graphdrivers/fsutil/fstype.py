"""Which filesystem a path lives on, and what is mounted where, read from /proc/self/mountinfo."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, what filesystem type, from which source."""

    target: Path
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """Every mount of this process's mount namespace, in mount order."""
    entries = []
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 6 or len(rfields) < 2:
                continue
            entries.append(
                MountEntry(
                    target=Path(_unescape(fields[4])),
                    fstype=rfields[0],
                    source=_unescape(rfields[1]),
                    options=fields[5] + ("," + rfields[2] if len(rfields) > 2 else ""),
                )
            )
    return entries


def mount_of(path: Path | str) -> MountEntry | None:
    """The mount that holds ``path`` (the deepest mount whose target is a prefix of it)."""
    real = Path(os.path.realpath(path))
    best: MountEntry | None = None
    for entry in mounts():
        holds = real == entry.target or entry.target in real.parents
        if holds and (best is None or len(entry.target.parts) >= len(best.target.parts)):
            best = entry
    return best


def filesystem_type(path: Path | str) -> str:
    """The filesystem type name (``ext4``, ``btrfs``, ``fuse.fusemount``...) of ``path``."""
    entry = mount_of(path)
    return entry.fstype if entry is not None else "unknown"


def mounts_under(path: Path | str) -> list[MountEntry]:
    """Mounts at or below ``path``, deepest first (the order to unmount them in)."""
    real = Path(os.path.realpath(path))
    found = [e for e in mounts() if e.target == real or real in e.target.parents]
    return sorted(found, key=lambda e: len(e.target.parts), reverse=True)
