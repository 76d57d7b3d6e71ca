"""The ``overlay`` driver: layers stacked by kernel overlayfs (moby's overlay2, in spirit).

Each layer stores only its own changes; the kernel merges a layer's ``diff/`` over the ``diff/``
dirs of its ancestors at mount time. The on-disk layout, shared with the ``union`` driver, is
drawn in :mod:`graphdrivers.drivers.unionfs.layout`::

    HOME/l/<SHORT> -> ../<id>/diff      HOME/<id>/{diff,work,merged,link,lower}

A writable mount is ``lowerdir=<ancestors>,upperdir=<id>/diff,workdir=<id>/work``; a read-only
one (``get(readonly=True)``, or a layer with children) is ``lowerdir=<id>/diff:<ancestors>``
and is also mounted ``MOUNT_ATTR_RDONLY``. Layers are handed to the kernel through the new mount
API, one ``fsconfig(lowerdir+)`` per layer (:mod:`graphdrivers.drivers.unionfs.mountapi`), so a
stack is never limited by mount(2)'s one-page option string; the layer count the kernel reports
is checked after every mount.

Mount options: ``index=on`` for writable mounts (the inode index keeps a copied-up hardlink
group one inode; before unmounting, the driver has the kernel link every name of such a group
into ``diff/``, and then empties ``work/index/``, see
:mod:`graphdrivers.drivers.unionfs.overlayindex`; moby mounts ``index=off`` and splits them),
``redirect_dir=off`` (renaming a lower directory fails with EXDEV and ``mv`` copies it, so
``diff/`` never holds a redirect a tar cannot express), ``metacopy=off`` (a copied-up file in
``diff/`` always holds its data, which the native diff reads).

``diff/`` uses the overlay whiteout format: a character device 0/0 hides a lower name, the xattr
``trusted.overlay.opaque=y`` marks a directory that hides its lower content. The native diff
turns them into ``.wh.<name>`` and ``.wh..wh..opq``; apply_diff turns them back.

Driver options:

``mount_api``
    ``auto`` (default), ``fd``, ``path`` or ``legacy``: how layers reach the kernel (see
    :class:`~graphdrivers.drivers.unionfs.mountapi.MountApi`).

Needs root (CAP_SYS_ADMIN) and ``overlay`` in ``/proc/filesystems``.

Limitations:

- The kernel stacks at most 500 lower layers, so a stack is at most 500 layers deep.
- Mounts are reference-counted per driver object. Two processes that mount the same layer of
  one home at once share ``merged/``: the second one replaces the first one's mount.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from graphdrivers.errors import InvalidOption, NotSupported
from graphdrivers.ids import LayerId
from graphdrivers.whiteout import WhiteoutFormat

from .unionfs.base import UnionDriverBase
from .unionfs.mountapi import MountApi, mount_overlay, unmount
from .unionfs.overlayindex import clear_index, link_up_aliases

log = logging.getLogger(__name__)

PROC_FILESYSTEMS = "/proc/filesystems"
PROC_STATUS = "/proc/self/status"
CAP_SYS_ADMIN = 21
#: the kernel's limit on lower layers of one overlay mount (OVL_MAX_STACK)
OVERLAY_MAX_STACK = 500
MOUNT_OPTIONS = {"index": "on", "redirect_dir": "off", "metacopy": "off"}
#: a read-only mount has no upper dir, so no index
READONLY_MOUNT_OPTIONS = {**MOUNT_OPTIONS, "index": "off"}


def kernel_has_overlay() -> bool:
    """True if the running kernel lists the overlay filesystem."""
    try:
        with open(PROC_FILESYSTEMS, encoding="ascii") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def has_cap_sys_admin() -> bool:
    """True if this process may mount: CAP_SYS_ADMIN is in its effective capability set."""
    try:
        with open(PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


class OverlayDriver(UnionDriverBase):
    """Kernel overlayfs over the shared union layout (see the module docstring)."""

    name: ClassVar[str] = "overlay"
    known_options: ClassVar[frozenset[str]] = frozenset({"mount_api"})
    max_depth: ClassVar[int] = OVERLAY_MAX_STACK

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        api = (options or {}).get("mount_api", MountApi.AUTO.value)
        try:
            self.mount_api = MountApi(api)
        except ValueError as exc:
            choices = ", ".join(m.value for m in MountApi)
            raise InvalidOption(f"overlay: mount_api={api!r}; use one of {choices}") from exc
        super().__init__(home, options)

    @property
    def whiteout_format(self) -> WhiteoutFormat:
        return WhiteoutFormat.OVERLAY

    def _check_host(self) -> None:
        if not kernel_has_overlay():
            raise NotSupported(
                "kernel filesystem overlay", hint="modprobe overlay", driver=self.name
            )
        if not has_cap_sys_admin():
            raise NotSupported(
                "privilege CAP_SYS_ADMIN to mount overlayfs",
                hint="run as root, or use the union driver",
                driver=self.name,
            )

    def _mount_stack(self, layer_id: LayerId, lowers: list[Path], readonly: bool) -> None:
        upper = None if readonly else self.layout.diff_dir(layer_id)
        work = None if readonly else self.layout.work_dir(layer_id)
        used = mount_overlay(
            self.layout.merged_dir(layer_id),
            lowers,
            upper,
            work,
            options=READONLY_MOUNT_OPTIONS if readonly else MOUNT_OPTIONS,
            readonly=readonly,
            api=self.mount_api,
        )
        log.debug("layer %s: overlay with %d lower(s) via %s", layer_id, len(lowers), used)

    def _unmount_stack(self, layer_id: LayerId) -> None:
        merged = self.layout.merged_dir(layer_id)
        work = self.layout.work_dir(layer_id)
        writable = layer_id not in self._readonly_mounts
        if writable:
            linked = link_up_aliases(merged, self.layout.diff_dir(layer_id), work)
            if linked:
                log.debug("layer %s: linked up %d hardlink name(s) into diff/", layer_id, linked)
        unmount(merged)
        if writable:
            clear_index(work)

    def _detach_stale(self, mountpoint: Path) -> None:
        unmount(mountpoint, lazy=True)
