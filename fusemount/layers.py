"""The layer stack: one upper (writable, optional) over read-only lowers, and how one name is
found in one layer.

Layers are ordered top first, as overlayfs does: ``lowerdir=A:B:C`` puts ``A`` directly under the
upper and ``C`` at the bottom. Every layer also has a *number* counted from the bottom (``C`` is
1, the upper is the highest); inode numbers are built from it (see :mod:`fusemount.inodes`), so
stacking a new layer on top leaves the numbers of the layers below, and therefore their inodes,
unchanged.

Each layer keeps one open directory fd for its root; everything below is reached with ``*at``
calls relative to directory fds (:mod:`fusemount.fdcache`), never by joining path strings, so
paths near ``PATH_MAX`` work.

Work directory layout (inside ``workdir=``)::

    W/
      fusemount/          WORK_SUBDIR: our scratch area (kernel overlayfs uses W/work, W/index)
        #<n>              a copy-up or new entry being built; renamed into the upper when whole
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import stat

from graphdrivers import whiteout as wh

log = logging.getLogger(__name__)

WORK_SUBDIR = "fusemount"
DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(eq=False)
class Layer:
    """One directory of the stack."""

    pos: int  # 0 is the top of the stack
    number: int  # 1 is the bottom of the stack
    path: str
    root_fd: int
    writable: bool


class Found(enum.Enum):
    """What one layer says about one name."""

    ABSENT = "absent"
    WHITEOUT = "whiteout"
    ENTRY = "entry"


def probe(dir_fd: int, name: bytes) -> tuple[Found, os.stat_result | None]:
    """Look ``name`` up in one layer directory: absent, whited out (either format), or an entry.

    An aufs ``.wh.<name>`` hides lower layers only; a same-layer ``name`` beside it wins, as the
    OCI layer rules say.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return (Found.WHITEOUT if has_aufs_whiteout(dir_fd, name) else Found.ABSENT), None
    if wh.is_overlay_whiteout(st):
        return Found.WHITEOUT, None
    return Found.ENTRY, st


def has_aufs_whiteout(dir_fd: int, name: bytes) -> bool:
    """True when ``.wh.<name>`` exists in this layer directory."""
    try:
        os.stat(b".wh." + name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # ENAMETOOLONG: such a whiteout cannot exist
        log.debug("aufs whiteout probe for %r: %s", name, exc)
        return False
    return True


def is_opaque(dir_fd: int) -> bool:
    """True when the directory hides all lower layers (either format)."""
    for attr in wh.OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(dir_fd, attr) == wh.OPAQUE_VALUE:
                return True
        except OSError:
            pass
    try:
        os.stat(wh.WHITEOUT_OPAQUE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class LayerStack:
    """The ordered layers of one mount, with the upper's work directory."""

    def __init__(self, lowerdirs: list[str], upperdir: str | None, workdir: str | None) -> None:
        paths = ([upperdir] if upperdir else []) + lowerdirs
        count = len(paths)
        self.layers: list[Layer] = []
        try:
            for pos, path in enumerate(paths):
                fd = os.open(path, DIR_OPEN_FLAGS & ~os.O_NOFOLLOW)
                writable = pos == 0 and upperdir is not None
                self.layers.append(Layer(pos, count - pos, path, fd, writable))
            self.upper: Layer | None = self.layers[0] if upperdir else None
            self.work_fd = -1
            if upperdir:
                self.work_fd = self._open_work(workdir)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_work(workdir: str | None) -> int:
        if not workdir:
            raise ValueError("upperdir needs a workdir")
        wfd = os.open(workdir, DIR_OPEN_FLAGS & ~os.O_NOFOLLOW)
        try:
            try:
                os.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
            except FileExistsError:
                pass
            fd = os.open(WORK_SUBDIR, DIR_OPEN_FLAGS, dir_fd=wfd)
        finally:
            os.close(wfd)
        clear_dir(fd)
        return fd

    @property
    def lowers(self) -> list[Layer]:
        return [layer for layer in self.layers if not layer.writable]

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.root_fd)
        self.layers = []
        if getattr(self, "work_fd", -1) >= 0:
            os.close(self.work_fd)
            self.work_fd = -1


def clear_dir(dir_fd: int) -> None:
    """Remove everything inside a directory (leftovers of a crashed copy-up, a dead dir)."""
    for entry in os.scandir(dir_fd):
        name = os.fsencode(entry.name)
        if entry.is_dir(follow_symlinks=False):
            sub = os.open(name, DIR_OPEN_FLAGS, dir_fd=dir_fd)
            try:
                clear_dir(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)


def is_dir_stat(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)
