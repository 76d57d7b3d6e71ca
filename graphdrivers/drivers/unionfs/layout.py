"""The on-disk layout the ``overlay`` and ``union`` drivers share (overlay2's, in spirit).

Each layer keeps only its own changes, in ``diff/``; a mount stacks them::

    HOME/                          0710
    ├── l/                         0700   short links, so that mount options stay short
    │   └── <SHORT> -> ../<id>/diff        one per layer; SHORT is 26 random [A-Z0-9]
    ├── empty/                     0700   the lower of a base layer's mount (a stack needs one)
    ├── <id>/                      0710   one directory per layer
    │   ├── diff/                          the layer's own content: the upper dir of its mount;
    │   │                                  a base layer's root is 0755 0:0, a child's root
    │   │                                  copies its parent's root owner and mode
    │   ├── work/                  0700   scratch dir of the mount (copy-up, atomic rename)
    │   ├── merged/                0700   the mountpoint get() returns
    │   ├── link                           the layer's SHORT name
    │   ├── lower                          "l/<SHORT>:l/<SHORT>:..." of the ancestors, nearest
    │   │                                  first (absent for a base layer)
    │   ├── mounted-by                     "<pid> <start time>" of the process that mounted
    │   │                                  merged/ (while it is mounted)
    │   └── daemon.pid                     union only: the fusemount daemon serving merged/
    ├── .whiteout-format                   union only: "overlay" or "aufs", the format the
    │                                      home was made with (no layer id starts with ".")
    ├── layers/ staging/ lock              the layer store (graphdrivers.store)

A writable mount is ``lowerdir=<ancestors' diffs>,upperdir=diff,workdir=work`` (a base layer's
lowerdir is ``empty/``). A read-only mount has no upper: ``lowerdir=diff:<ancestors' diffs>``.
``diff/`` holds whiteouts in the format of the driver that wrote it (overlay: char device 0/0
and the opaque xattr; aufs: ``.wh.`` files), see :mod:`graphdrivers.whiteout`.

``mounted-by`` tells a mount another live process made (which this process must leave alone)
from one a crashed process left behind (which ``get`` replaces and ``cleanup`` removes); the
start time guards against a reused PID.

The ``l/`` links are derived data: :meth:`UnionLayout.repair_links` rebuilds missing ones from
each layer's ``link`` file and drops stray ones at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import string
from pathlib import Path

from graphdrivers.errors import DriverError
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.ids import LayerId
from graphdrivers.store import atomic_write, make_private_dir

log = logging.getLogger(__name__)

LINK_DIR = "l"
EMPTY_DIR = "empty"
DIFF_DIR = "diff"
WORK_DIR = "work"
MERGED_DIR = "merged"
LINK_FILE = "link"
LOWER_FILE = "lower"
DAEMON_PID_FILE = "daemon.pid"
OWNER_FILE = "mounted-by"
WHITEOUT_FORMAT_FILE = ".whiteout-format"

LAYER_DIR_MODE = 0o710
BASE_ROOT_MODE = 0o755
SHORT_NAME_LENGTH = 26
_SHORT_ALPHABET = string.ascii_uppercase + string.digits
LOWER_SEPARATOR = ":"

#: ids the layout keeps for its own directories
RESERVED_IDS = frozenset({LINK_DIR, EMPTY_DIR})


class UnionLayout:
    """Paths and directory operations of the layout drawn in the module docstring."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.link_dir = home / LINK_DIR
        self.empty_dir = home / EMPTY_DIR

    def init(self) -> None:
        """Make ``l/`` and ``empty/`` (idempotent)."""
        make_private_dir(self.link_dir)
        make_private_dir(self.empty_dir)

    # ------------------------------------------------------------------ home records

    def recorded_whiteout(self) -> str | None:
        """The whiteout format the home was made with, or None (a new or older home).

        One home holds one format: ``diff/`` dirs in two formats would make every reader of
        them (a kernel overlay mount by hand, the native diff) guess per layer.
        """
        try:
            return (self.home / WHITEOUT_FORMAT_FILE).read_text().strip()
        except FileNotFoundError:
            return None

    def record_whiteout(self, fmt: str) -> None:
        atomic_write(self.home / WHITEOUT_FORMAT_FILE, f"{fmt}\n".encode(), 0o644)

    # ------------------------------------------------------------------ paths

    def layer_dir(self, layer_id: LayerId) -> Path:
        return self.home / layer_id

    def diff_dir(self, layer_id: LayerId) -> Path:
        return self.home / layer_id / DIFF_DIR

    def work_dir(self, layer_id: LayerId) -> Path:
        return self.home / layer_id / WORK_DIR

    def merged_dir(self, layer_id: LayerId) -> Path:
        return self.home / layer_id / MERGED_DIR

    def pid_file(self, layer_id: LayerId) -> Path:
        return self.home / layer_id / DAEMON_PID_FILE

    def owner_file(self, layer_id: LayerId) -> Path:
        return self.home / layer_id / OWNER_FILE

    def short_name(self, layer_id: LayerId) -> str:
        return (self.layer_dir(layer_id) / LINK_FILE).read_text().strip()

    def lower_links(self, layer_id: LayerId) -> list[str]:
        """The ancestors' ``l/<SHORT>`` entries, nearest first (empty for a base layer)."""
        try:
            text = (self.layer_dir(layer_id) / LOWER_FILE).read_text().strip()
        except FileNotFoundError:
            return []
        return text.split(LOWER_SEPARATOR) if text else []

    def lower_dirs(self, layer_id: LayerId) -> list[Path]:
        """The ancestors' diff directories as paths through ``l/``, nearest first."""
        return [self.home / link for link in self.lower_links(layer_id)]

    def depth(self, layer_id: LayerId) -> int:
        """Layers in the stack of ``layer_id``, itself included."""
        return len(self.lower_links(layer_id)) + 1

    # ------------------------------------------------------------------ create and remove

    def create(self, layer_id: LayerId, parent: LayerId | None) -> None:
        """Make the directories, short link and lower file of a new layer."""
        layer = self.layer_dir(layer_id)
        layer.mkdir(mode=LAYER_DIR_MODE)
        os.chmod(layer, LAYER_DIR_MODE)

        diff = self.diff_dir(layer_id)
        diff.mkdir()
        if parent is None:
            os.chown(diff, 0, 0)
            os.chmod(diff, BASE_ROOT_MODE)
        else:
            st = os.stat(self.diff_dir(parent))
            os.chown(diff, st.st_uid, st.st_gid)
            os.chmod(diff, stat.S_IMODE(st.st_mode))
        make_private_dir(self.work_dir(layer_id))
        make_private_dir(self.merged_dir(layer_id))

        short = self._new_short_name()
        (layer / LINK_FILE).write_text(short)
        os.symlink(Path("..") / layer_id / DIFF_DIR, self.link_dir / short)
        if parent is not None:
            lowers = [f"{LINK_DIR}/{self.short_name(parent)}", *self.lower_links(parent)]
            (layer / LOWER_FILE).write_text(LOWER_SEPARATOR.join(lowers))

    def _new_short_name(self) -> str:
        for _ in range(100):
            name = "".join(secrets.choice(_SHORT_ALPHABET) for _ in range(SHORT_NAME_LENGTH))
            if not os.path.lexists(self.link_dir / name):
                return name
        raise DriverError(f"could not pick a free short link name in {self.link_dir}")

    def remove(self, layer_id: LayerId) -> None:
        """Delete a layer's link and directory; parts already gone are fine."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            short = self.short_name(layer_id)
            if short and "/" not in short:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.link_dir / short)
        remove_tree(self.layer_dir(layer_id))

    def reset_work(self, layer_id: LayerId) -> None:
        """Empty ``work/`` (overlayfs leaves a ``work/work`` dir that only root may remove)."""
        work = self.work_dir(layer_id)
        for entry in os.listdir(work):
            remove_tree(work / entry)

    # ------------------------------------------------------------------ mount owners

    def record_owner(self, layer_id: LayerId) -> None:
        """Note that this process mounted ``merged/`` of ``layer_id``."""
        pid = os.getpid()
        atomic_write(self.owner_file(layer_id), f"{pid} {process_start(pid)}\n".encode())

    def clear_owner(self, layer_id: LayerId) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.owner_file(layer_id))

    def live_owner(self, layer_id: LayerId) -> int | None:
        """The PID of another live process that mounted ``layer_id``, or None."""
        try:
            pid_text, start = self.owner_file(layer_id).read_text().split()
            pid = int(pid_text)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if pid == os.getpid() or process_start(pid) != start:
            return None
        return pid

    # ------------------------------------------------------------------ repair

    def repair_links(self, layer_ids: list[LayerId]) -> None:
        """Recreate missing ``l/`` links of ``layer_ids`` and drop links to no layer."""
        wanted: dict[str, LayerId] = {}
        for layer_id in layer_ids:
            try:
                wanted[self.short_name(layer_id)] = layer_id
            except FileNotFoundError:
                continue

        for name in os.listdir(self.link_dir):
            if name not in wanted:
                log.info("removing stray short link %s", self.link_dir / name)
                os.unlink(self.link_dir / name)
        for name, layer_id in wanted.items():
            link = self.link_dir / name
            target = Path("..") / layer_id / DIFF_DIR
            if not os.path.lexists(link):
                log.info("recreating short link %s of layer %s", link, layer_id)
                os.symlink(target, link)


def process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ("" if there is none)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""
