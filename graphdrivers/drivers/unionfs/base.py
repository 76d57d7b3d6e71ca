"""What the ``overlay`` and ``union`` drivers share: the layout, the rules for mounting, the diff.

A subclass says how to put a stack on ``merged/`` and take it off (kernel overlayfs, or a
fusemount daemon) and which whiteout format its ``diff/`` dirs hold; everything else is here:

- **create** makes the layer's directories and short link (:mod:`.layout`); a stack deeper than
  :attr:`UnionDriverBase.max_depth` layers is refused.
- **get** mounts writable (``upperdir=diff``) unless ``readonly=True`` or the layer has children:
  a parent's ``diff/`` is a lower of its children's mounts, and changing a lower under a mount
  is undefined for overlayfs, so a layer with children is frozen and always mounts read-only
  (writes fail with EROFS).
- **diff** against the direct parent (or ``None`` for a base layer) is native: a walk of
  ``diff/`` that turns the driver's whiteouts into OCI ones (:mod:`.nativediff`). Against any
  other layer, or while the layer is mounted writable (a FUSE writeback cache may hold data
  not yet in ``diff/``), it is the generic naive diff.
- **apply_diff** unpacks straight into ``diff/``, turning OCI whiteouts into the driver's format.
- **changes** and **diff_size** are the generic naive ones (moby dropped its upper-dir walk for
  changes because opaque directories made it wrong).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import IO, BinaryIO, ClassVar

from graphdrivers.driver import Capabilities, Driver
from graphdrivers.errors import DriverError, LayerBusy, MountError
from graphdrivers.fsutil.fstype import filesystem_type, mounts_under
from graphdrivers.ids import LayerId
from graphdrivers.store import LayerRecord
from graphdrivers.whiteout import WhiteoutFormat

from .layout import MERGED_DIR, RESERVED_IDS, UnionLayout

log = logging.getLogger(__name__)

#: backing filesystems a union driver works badly on, with the reason (status() and doctor)
POOR_BACKING = {
    "btrfs": "union drivers on btrfs copy whole files on first write; the btrfs driver "
    "snapshots instead",
    "overlay": "an overlay upper dir cannot itself be on overlayfs",
}


class UnionDriverBase(Driver):
    """A driver storing each layer as its own changes over its ancestors' (see module doc)."""

    reserved_ids = RESERVED_IDS
    max_depth: ClassVar[int] = 128

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        self.layout = UnionLayout(Path(home).absolute())
        self._readonly_mounts: set[LayerId] = set()
        super().__init__(home, options)

    # ---------------------------------------------------------------- what subclasses say

    @property
    @abc.abstractmethod
    def whiteout_format(self) -> WhiteoutFormat:
        """The whiteout format this driver's ``diff/`` dirs hold."""

    @abc.abstractmethod
    def _mount_stack(self, layer_id: LayerId, lowers: list[Path], readonly: bool) -> None:
        """Mount ``lowers`` (topmost first) at merged/, with diff/ as upper unless readonly."""

    @abc.abstractmethod
    def _unmount_stack(self, layer_id: LayerId) -> None:
        """Take the mount off ``merged/`` (it is mounted)."""

    @abc.abstractmethod
    def _detach_stale(self, mountpoint: Path) -> None:
        """Remove a mount this driver object did not make (a crashed process left it)."""

    # ---------------------------------------------------------------- storage hooks

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_diff=True,
            reproducible_diff=True,
            max_depth=self.max_depth,
            whiteout_format=self.whiteout_format,
        )

    def _init_home(self) -> None:
        self.layout.init()
        self.layout.repair_links([r.id for r in self.store.records()])

    def _create_layer(self, record: LayerRecord) -> None:
        if record.parent is not None:
            depth = self.layout.depth(record.parent) + 1
            if depth > self.max_depth:
                raise DriverError(
                    f"cannot create {record.id!r}: its stack would be {depth} layers deep; "
                    f"the {self.name} driver stacks at most {self.max_depth}",
                    layer_id=record.id,
                    expected=self.max_depth,
                    got=depth,
                )
        self.layout.create(record.id, record.parent)

    def _remove_layer(self, layer_id: LayerId) -> None:
        for entry in mounts_under(self.layout.layer_dir(layer_id)):
            self._detach_stale(entry.target)
        self.layout.remove(layer_id)

    def _mount(self, record: LayerRecord, readonly: bool) -> Path:
        lid = record.id
        merged = self.layout.merged_dir(lid)
        for entry in mounts_under(merged):
            owner = self.layout.live_owner(lid)
            if owner is not None:
                raise LayerBusy(
                    f"layer {lid!r} is mounted at {merged} by process {owner}, which uses the "
                    "same home; put() it there first",
                    layer_id=lid,
                    path=merged,
                )
            log.info("layer %s: replacing mount %s left by another process", lid, entry.target)
            self._detach_stale(entry.target)

        readonly = readonly or bool(self.store.children(lid))
        lowers = self.layout.lower_dirs(lid)
        if readonly:
            lowers = [self.layout.diff_dir(lid), *lowers]
        if len(lowers) < (2 if readonly else 1):
            lowers.append(self.layout.empty_dir)

        # Owner first: another process's cleanup() must never see this mount unclaimed.
        self.layout.record_owner(lid)
        try:
            self._mount_stack(lid, lowers, readonly)
        except BaseException:
            self.layout.clear_owner(lid)
            raise
        if readonly:
            self._readonly_mounts.add(lid)
        else:
            self._readonly_mounts.discard(lid)
        return merged

    def _unmount(self, layer_id: LayerId) -> None:
        merged = self.layout.merged_dir(layer_id)
        if any(e.target == merged for e in mounts_under(merged)):
            self._unmount_stack(layer_id)
        else:
            log.debug("layer %s: %s was already unmounted", layer_id, merged)
        self.layout.clear_owner(layer_id)
        self._readonly_mounts.discard(layer_id)

    def _mount_present(self, layer_id: LayerId) -> bool | None:
        merged = self.layout.merged_dir(layer_id)
        return any(e.target == merged for e in mounts_under(merged))

    def _mount_owner(self, layer_id: LayerId) -> int | None:
        return self.layout.live_owner(layer_id)

    def _mounted_elsewhere(self, layer_id: LayerId) -> bool:
        """A mount whose recorded owner is another live process; a dead owner's is stale.

        A stale mount (its process crashed) is detached by remove, as get replaces it.
        """
        if self._refs.get(layer_id, 0) > 0 or self.layout.live_owner(layer_id) is None:
            return False
        return self._mount_present(layer_id) is True

    def _cleanup(self) -> None:
        """Unmount what is left under the home: this process's mounts and crashed ones'.

        A mount recorded as made by another live process (another driver on this home) stays.
        """
        for entry in mounts_under(self.home):
            if entry.target.name != MERGED_DIR:
                continue
            lid = LayerId(entry.target.parent.name)
            if self.layout.live_owner(lid) is not None:
                continue
            log.info("cleanup: unmounting %s", entry.target)
            try:
                self._detach_stale(entry.target)
            except MountError:
                if any(e.target == entry.target for e in mounts_under(entry.target)):
                    raise
                log.debug("cleanup: %s was unmounted meanwhile", entry.target)
            self.layout.clear_owner(lid)

    def _metadata(self, record: LayerRecord) -> dict[str, str]:
        lid = record.id
        meta = {
            "UpperDir": str(self.layout.diff_dir(lid)),
            "WorkDir": str(self.layout.work_dir(lid)),
            "MergedDir": str(self.layout.merged_dir(lid)),
        }
        lowers = self.layout.lower_dirs(lid)
        if lowers:
            meta["LowerDir"] = ":".join(str(p) for p in lowers)
        return meta

    def _status_extra(self) -> dict[str, str]:
        backing = filesystem_type(self.home)
        extra = {
            "whiteout_format": self.whiteout_format.value,
            "max_depth": str(self.max_depth),
            "native_diff": "true",
        }
        if backing in POOR_BACKING:
            extra["warning"] = f"home is on {backing}: {POOR_BACKING[backing]}"
        return extra

    # ---------------------------------------------------------------- the diff side

    def _native_diff_possible(self, layer_id: LayerId, parent: LayerId | None) -> bool:
        record = self.store.require(layer_id)
        writable_mount = self.is_mounted(layer_id) and layer_id not in self._readonly_mounts
        return record.parent == parent and not writable_mount

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        """Native (a walk of diff/) against the direct parent, naive otherwise."""
        from graphdrivers.archive.tarstream import IteratorStream

        from .nativediff import export_upper

        lid, pid = self._pair(layer_id, parent)
        if not self._native_diff_possible(lid, pid):
            log.debug("diff %s against %s: naive", lid, pid)
            return super().diff(lid, pid)
        lowers = self.layout.lower_dirs(lid)
        return IteratorStream(export_upper(self.layout.diff_dir(lid), lowers))

    def _apply(self, layer_id: LayerId, parent: LayerId | None, stream: BinaryIO) -> int:
        """Unpack straight into diff/, whiteouts in this driver's format."""
        from graphdrivers.archive import ApplyOptions, apply_layer

        options = ApplyOptions(whiteouts=self.whiteout_format.value)
        return apply_layer(self.layout.diff_dir(layer_id), stream, options)
