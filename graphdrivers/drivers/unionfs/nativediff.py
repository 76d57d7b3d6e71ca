"""The native diff of a union layer: its upper dir ``diff/``, whiteouts turned into OCI ones.

A layer's ``diff/`` already holds exactly its changes against its parent, so the diff against
the direct parent needs no mount and no tree comparison: walk ``diff/`` (sorted, so the bytes
are the same every time) and write every entry as it is, except the union's own markers, which
become the OCI layer format's:

======================================  ==================================================
in ``diff/``                            in the tar
======================================  ==================================================
char device 0/0 ``name`` (overlay)      an empty file ``.wh.name``
dir with ``*.overlay.opaque=y``         the dir, then an empty file ``dir/.wh..wh..opq``
file ``.wh.name`` (aufs)                ``.wh.name`` (dropped if ``name`` is beside it:
                                        a whiteout hides lower layers only)
file ``.wh..wh..opq`` (aufs)            ``dir/.wh..wh..opq``
other ``.wh..wh.*`` (aufs metadata)     nothing
char 0/0 ``.wh..opq`` (fuse-overlayfs)  ``dir/.wh..wh..opq`` (its opaque marker)
======================================  ==================================================

A directory's opaque marker is written once whichever of these marked it. The walk makes a
change list (every entry an Add, every whiteout a Delete) and hands it to
:func:`graphdrivers.archive.export_changes`, which writes headers, hardlink groups and xattrs the
same way as for the naive diff; union bookkeeping xattrs (``*.overlay.*``) are never exported.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from graphdrivers.driver import Change, Kind
from graphdrivers.whiteout import (
    INVALID_WHITEOUT_NAMES,
    OPAQUE_VALUE,
    OVERLAY_OPAQUE_XATTRS,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    is_overlay_whiteout,
    is_whiteout_name,
    whited_out_name,
)

log = logging.getLogger(__name__)

#: the name whose whiteout is the opaque marker: whiteout_name(".wh..opq") == ".wh..wh..opq"
OPAQUE_WHITEOUT_TARGET = WHITEOUT_OPAQUE[len(WHITEOUT_PREFIX) :]
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def upper_changes(upper: Path) -> list[Change]:
    """The changes a layer's upper dir records (see the module docstring), sorted by path."""
    changes: list[Change] = []
    fd = os.open(upper, DIR_FLAGS)
    try:
        _walk(fd, "", changes)
    finally:
        os.close(fd)
    changes.sort()
    return changes


def _is_opaque(dir_fd: int, name: str) -> bool:
    path = f"/proc/self/fd/{dir_fd}/{name}"
    for attr in OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == OPAQUE_VALUE:
                return True
        except OSError:
            continue
    return False


def _walk(dir_fd: int, prefix: str, out: list[Change]) -> None:
    with os.scandir(dir_fd) as it:
        entries = {e.name: e.stat(follow_symlinks=False) for e in it}

    opaque = False
    for name in sorted(entries):
        st = entries[name]
        path = f"{prefix}/{name}"
        if name == WHITEOUT_OPAQUE:
            opaque = True
        elif name in INVALID_WHITEOUT_NAMES:
            log.debug("native diff: skipping invalid whiteout name %s", path)
        elif name.startswith(WHITEOUT_META_PREFIX):
            log.debug("native diff: skipping aufs metadata %s", path)
        elif is_overlay_whiteout(st):
            if name == OPAQUE_WHITEOUT_TARGET:
                opaque = True
            else:
                out.append(Change(path, Kind.DELETE))
        elif is_whiteout_name(name):
            if whited_out_name(name) not in entries:
                out.append(Change(f"{prefix}/{whited_out_name(name)}", Kind.DELETE))
        else:
            out.append(Change(path, Kind.ADD))
            if stat.S_ISDIR(st.st_mode):
                if _is_opaque(dir_fd, name):
                    out.append(Change(f"{path}/{OPAQUE_WHITEOUT_TARGET}", Kind.DELETE))
                child = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _walk(child, path, out)
                finally:
                    os.close(child)

    if opaque and prefix:
        marker = Change(f"{prefix}/{OPAQUE_WHITEOUT_TARGET}", Kind.DELETE)
        if marker not in out:
            out.append(marker)


def export_upper(upper: Path) -> Iterator[bytes]:
    """The OCI layer tar of the upper dir ``upper``: its entries, whiteouts converted."""
    from graphdrivers.archive.export import export_changes

    return export_changes(upper, upper_changes(upper))
