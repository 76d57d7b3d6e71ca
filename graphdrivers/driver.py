"""The Driver contract every graph driver implements, and the vocabulary it is written in.

Vocabulary (code, CLI, docs and tests use these words with these meanings only):

layer id
    The name of a layer: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` (:mod:`graphdrivers.ids`).
parent
    The layer a layer was created from. A layer starts with its parent's content; a layer with no
    parent starts empty, its root directory 0755 root:root.
mountpoint
    The directory :meth:`Driver.get` returns, where the layer's full content (its own changes over
    all its ancestors) can be read and, for a writable layer, changed.
lower / upper / work
    In union drivers: the read-only directories of the ancestors (lowers), the layer's own
    writable directory (upper) and the scratch directory copy-up goes through (work).
whiteout / opaque
    How a layer records that a name of a lower layer is deleted, or that a directory hides all its
    lower content (:mod:`graphdrivers.whiteout`).
snapshot
    A copy-on-write copy of a parent made in O(1) (btrfs subvolume snapshots, dm-thin snapshots).
thin device / pool
    In devicemapper: a thinly provisioned block device, and the pool of data blocks and metadata
    all thin devices of a driver share.
diff
    An uncompressed OCI layer tar holding a layer's changes against a parent, with ``.wh.``
    whiteouts and ``.wh..wh..opq`` opaque markers.
change
    One entry of :meth:`Driver.changes`: a path and whether it was added, modified or deleted.

A driver is an object bound to one *home* directory. Every public method below is implemented
here once, in terms of a small set of storage hooks (``_create_layer``, ``_remove_layer``,
``_mount``, ``_unmount``, ...) that each driver writes. The store (:mod:`graphdrivers.store`)
keeps one record per layer, so parents, children, crash recovery and the order of
:meth:`list_layers` are the same for every driver. The diff side (diff, changes, apply_diff,
diff_size) has a generic naive implementation built on get/put and tree comparison; a driver
overrides it where it knows better (the union driver reads its upper directory).

Semantics pinned here:

- ``get``/``put`` are reference-counted per driver object: the first ``get`` mounts, the last
  ``put`` unmounts, ``put`` without ``get`` raises :class:`NotMounted`. ``readonly`` takes effect
  when that ``get`` is the one that mounts. A ``get`` that would mount a layer another live
  process has mounted (:meth:`Driver._mounted_elsewhere`) raises :class:`LayerBusy`.
- ``remove`` refuses a layer with children (:class:`LayerHasChildren`) or a mounted one
  (:class:`LayerBusy`): mounted by this driver object, or, for drivers whose ``get`` makes a
  real mount, by another live process (:meth:`Driver._mounted_elsewhere`). ``apply_diff`` to
  an existing layer refuses the same mounts.
- ``diff(id, parent)`` and ``changes(id, parent)`` compare ``id`` with ``parent``; with
  ``parent=None`` every entry of ``id`` counts as added (the full tree), as in moby.
- ``apply_diff(id, parent, stream)`` unpacks a layer tar into ``id``. If ``id`` does not exist it
  is created on ``parent`` first. The layer is visible only once the apply is complete: if the
  stream is malformed or hostile (or the process dies) the layer is removed, so it is whole or
  absent. It returns what ``diff_size(id, parent)`` reports afterwards.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, BinaryIO, ClassVar

from graphdrivers.errors import (
    DriverError,
    InvalidOption,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    NotMounted,
    ParentNotFound,
)
from graphdrivers.ids import LayerId, validate_layer_id
from graphdrivers.store import LayerRecord, LayerState, LayerStore
from graphdrivers.whiteout import WhiteoutFormat

log = logging.getLogger(__name__)


class Kind(enum.IntEnum):
    """What happened to a path, with moby's numbering."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclasses.dataclass(frozen=True, order=True)
class Change:
    """One entry of :meth:`Driver.changes`: an absolute path inside the layer and its kind."""

    path: str
    kind: Kind

    def __str__(self) -> str:
        return f"{'CAD'[self.kind]} {self.path}"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a driver can do, so callers and the conformance suite know what to expect."""

    native_diff: bool = False
    reproducible_diff: bool = True
    quota: bool = False
    max_depth: int | None = None
    whiteout_format: WhiteoutFormat | None = None
    supports_devices: bool = True


@dataclasses.dataclass(frozen=True)
class Status:
    """Structured diagnostics; ``extra`` holds driver-specific fields."""

    driver: str
    home: str
    backing_filesystem: str
    layers: int
    mounted: int
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Driver(abc.ABC):
    """A graph driver bound to one home directory (see the module docstring for the contract).

    Subclasses set :attr:`name` and implement the storage hooks. They may raise
    :class:`~graphdrivers.errors.NotSupported` from ``__init__`` (via :meth:`_check_host`) when
    the host lacks what they need.
    """

    name: ClassVar[str] = "abstract"
    reserved_ids: ClassVar[frozenset[str]] = frozenset()
    known_options: ClassVar[frozenset[str]] = frozenset()
    known_storage_opts: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        self.home = Path(home).absolute()
        self.options = dict(options or {})
        unknown = set(self.options) - self.known_options
        if unknown:
            raise InvalidOption(
                f"{self.name}: unknown driver option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(self.known_options)) or 'none'}"
            )

        self._check_host()
        self.store = LayerStore(self.home)
        self._refs: dict[LayerId, int] = {}
        self._mounts: dict[LayerId, Path] = {}
        self._refs_lock = threading.RLock()
        with self.store.lock():
            self._init_home()
            self._recover()

    # ----------------------------------------------------------------- storage hooks

    def _check_host(self) -> None:
        """Raise NotSupported if this host cannot run the driver (before the home is touched)."""

    def _init_home(self) -> None:
        """Make the driver's own directories under the home (called with the store lock)."""

    @abc.abstractmethod
    def _create_layer(self, record: LayerRecord) -> None:
        """Make the storage of a new layer holding its parent's content (or empty)."""

    @abc.abstractmethod
    def _remove_layer(self, layer_id: LayerId) -> None:
        """Delete a layer's storage; must tolerate storage that is partly or wholly missing."""

    @abc.abstractmethod
    def _mount(self, record: LayerRecord, readonly: bool) -> Path:
        """Make the layer's content visible and return the mountpoint."""

    def _unmount(self, layer_id: LayerId) -> None:
        """Undo :meth:`_mount`; the default has nothing to undo."""

    def _mount_present(self, layer_id: LayerId) -> bool | None:
        """Whether the layer's mount is on the system now, whoever made it.

        None (the default) for drivers whose ``get`` makes no real mount (vfs, btrfs): there
        is nothing to find. The CLI uses it to tell a live mount record from a stale one.
        """
        return None

    def _mounted_elsewhere(self, layer_id: LayerId) -> bool:
        """True if a live mount of the layer exists that this driver object did not make.

        Reference counts are per driver object, so without this another process's mount is
        invisible to :meth:`remove` and :meth:`apply_diff`, which would pull the layer out
        from under it, and to :meth:`get`, which would mount its filesystem a second time.
        The default trusts :meth:`_mount_present`; a driver that records who mounted (the
        union drivers) narrows it to live owners.
        """
        return self._refs.get(layer_id, 0) == 0 and self._mount_present(layer_id) is True

    def _mount_owner(self, layer_id: LayerId) -> int | None:
        """The PID of the other live process that mounted the layer, where the driver records
        who mounts (the union drivers); None where it does not."""
        return None

    def _elsewhere(self, layer_id: LayerId) -> str:
        """How busy messages name the other process: by PID when the driver knows it."""
        pid = self._mount_owner(layer_id)
        return "another process" if pid is None else f"another process (PID {pid})"

    def _refuse_if_busy(self, layer_id: LayerId, verb: str) -> None:
        """Raise LayerBusy if this object or another process has the layer mounted."""
        refs = self._refs.get(layer_id, 0)
        if refs > 0:
            raise LayerBusy(
                f"{verb}: layer {layer_id!r} is mounted ({refs} get(s) outstanding); "
                "put() it first",
                layer_id=layer_id,
            )
        if self._mounted_elsewhere(layer_id):
            raise LayerBusy(
                f"{verb}: layer {layer_id!r} is mounted by {self._elsewhere(layer_id)}; "
                "unmount it there first",
                layer_id=layer_id,
            )

    def _metadata(self, record: LayerRecord) -> dict[str, str]:
        """Driver-specific metadata keys (moby's names: SourceDir, UpperDir, DeviceId...)."""
        return {}

    def _status_extra(self) -> dict[str, str]:
        return {}

    def _cleanup(self) -> None:
        """Driver-specific shutdown after every layer has been unmounted."""

    def capabilities(self) -> Capabilities:
        return Capabilities()

    # ----------------------------------------------------------------- layer lifecycle

    def create(
        self,
        layer_id: str,
        parent: str | None = None,
        *,
        rw: bool = False,
        storage_opt: Mapping[str, str] | None = None,
    ) -> None:
        """Create layer ``layer_id`` holding ``parent``'s content (empty without a parent)."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        pid = validate_layer_id(parent, self.reserved_ids) if parent is not None else None
        opts = self._check_storage_opt(lid, rw, storage_opt)

        with self.store.lock():
            if self.store.get(lid) is not None:
                raise LayerExists(lid)
            if pid is not None and not self._is_ready(pid):
                raise ParentNotFound(lid, pid)

            record = self.store.new_record(lid, pid, rw=rw, storage_opt=opts)
            try:
                self._create_layer(record)
            except BaseException:
                self._rollback(lid)
                raise
            self.store.set_state(lid, LayerState.READY)
        log.debug("created layer %s (parent %s)", lid, pid)

    def _check_storage_opt(
        self, layer_id: LayerId, rw: bool, storage_opt: Mapping[str, str] | None
    ) -> dict[str, str]:
        opts = dict(storage_opt or {})
        unknown = set(opts) - self.known_storage_opts
        if unknown:
            raise InvalidOption(
                f"{self.name}: storage option(s) {', '.join(sorted(unknown))} not supported "
                f"for layer {layer_id!r}; supported: "
                f"{', '.join(sorted(self.known_storage_opts)) or 'none'}",
                layer_id=layer_id,
            )
        return opts

    def remove(self, layer_id: str, *, missing_ok: bool = False) -> None:
        """Remove a layer that has no children and is not mounted."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        with self.store.lock():
            if not self._is_ready(lid):
                if missing_ok:
                    return
                raise LayerNotFound(lid)

            children = self.store.children(lid)
            if children:
                raise LayerHasChildren(lid, children)
            self._refuse_if_busy(lid, "remove")

            self.store.set_state(lid, LayerState.REMOVING)
            self._remove_layer(lid)
            self.store.delete(lid)
        log.debug("removed layer %s", lid)

    def _rollback(self, layer_id: LayerId) -> None:
        """Remove a half-made layer and its record (the store lock is held)."""
        try:
            with self._refs_lock:
                if self._refs.pop(layer_id, 0):
                    self._unmount(layer_id)
                    self._mounts.pop(layer_id, None)
            self._remove_layer(layer_id)
        except Exception:
            log.exception("could not roll back layer %s; its record is kept", layer_id)
            return
        self.store.delete(layer_id)

    def _recover(self) -> None:
        """Roll back every layer a crash left mid-operation (called at start-up, locked)."""
        for record in self.store.unfinished():
            log.info(
                "rolling back layer %s left %s by an interrupted process",
                record.id,
                record.state.value,
            )
            self._remove_layer(record.id)
            self.store.delete(record.id)
        self.store.clear_staging()

    def exists(self, layer_id: str) -> bool:
        """True if a complete layer with this id exists."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        return self._is_ready(lid)

    def _is_ready(self, layer_id: LayerId) -> bool:
        record = self.store.get(layer_id)
        return record is not None and record.state is LayerState.READY

    def parent(self, layer_id: str) -> LayerId | None:
        """The parent of a layer, or None for a layer created empty."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        return self.store.require(lid).parent

    def list_layers(self) -> list[LayerId]:
        """Every complete layer, children before parents (an order in which all can be removed)."""
        from graphdrivers.store import order_children_first

        return [r.id for r in order_children_first(self.store.ready())]

    def metadata(self, layer_id: str) -> dict[str, str]:
        """Driver-specific facts about a layer, plus its Parent."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        record = self.store.require(lid)
        meta = {"Parent": record.parent or ""}
        meta.update(self._metadata(record))
        return meta

    def status(self) -> Status:
        from graphdrivers.fsutil.fstype import filesystem_type

        with self._refs_lock:
            mounted = sum(1 for n in self._refs.values() if n > 0)
        return Status(
            driver=self.name,
            home=str(self.home),
            backing_filesystem=filesystem_type(self.home),
            layers=len(self.store.ready()),
            mounted=mounted,
            extra=self._status_extra(),
        )

    def cleanup(self) -> None:
        """Unmount every layer this driver mounted and shut down. Idempotent."""
        with self._refs_lock:
            for lid in list(self._refs):
                try:
                    self._unmount(lid)
                except DriverError:
                    log.exception("cleanup: unmounting layer %s failed", lid)
                self._refs.pop(lid, None)
                self._mounts.pop(lid, None)
        self._cleanup()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ----------------------------------------------------------------- mounting

    def get(self, layer_id: str, *, readonly: bool = False) -> Path:
        """Mount the layer (first call) and return its mountpoint; every get needs a put."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        with self._refs_lock:
            if self._refs.get(lid, 0) > 0:
                self._refs[lid] += 1
                return self._mounts[lid]

            record = self.store.require(lid)
            if self._mounted_elsewhere(lid):  # a second mount of one filesystem corrupts it
                raise LayerBusy(
                    f"layer {lid!r} is mounted by {self._elsewhere(lid)}; put() it there first",
                    layer_id=lid,
                )
            path = self._mount(record, readonly)
            self._refs[lid] = 1
            self._mounts[lid] = path
            log.debug("mounted layer %s at %s", lid, path)
            return path

    def put(self, layer_id: str) -> None:
        """Release one get; the last put unmounts."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        with self._refs_lock:
            count = self._refs.get(lid, 0)
            if count <= 0:
                raise NotMounted(lid)
            if count > 1:
                self._refs[lid] = count - 1
                return

            self._unmount(lid)
            del self._refs[lid]
            del self._mounts[lid]
            log.debug("unmounted layer %s", lid)

    def is_mounted(self, layer_id: str) -> bool:
        lid = validate_layer_id(layer_id, self.reserved_ids)
        with self._refs_lock:
            return self._refs.get(lid, 0) > 0

    @contextlib.contextmanager
    def mounted(self, layer_id: str, *, readonly: bool = False) -> Iterator[Path]:
        """``with driver.mounted(id) as root:`` -- get on entry, put on exit."""
        path = self.get(layer_id, readonly=readonly)
        try:
            yield path
        finally:
            self.put(layer_id)

    # ----------------------------------------------------------------- the diff side

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        """An uncompressed OCI layer tar of ``layer_id``'s changes against ``parent``.

        The stream must be closed (or used as a context manager): closing releases the mounts.
        """
        from graphdrivers.archive import export_changes
        from graphdrivers.archive.tarstream import IteratorStream

        lid, pid = self._pair(layer_id, parent)
        stack = contextlib.ExitStack()
        try:
            root = stack.enter_context(self.mounted(lid, readonly=True))
            proot = stack.enter_context(self.mounted(pid, readonly=True)) if pid else None
            changes = self._naive_changes(root, proot)
        except BaseException:
            stack.close()
            raise
        return IteratorStream(export_changes(root, changes), on_close=stack.close)

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """Paths added, modified and deleted in ``layer_id`` against ``parent`` (moby's rules)."""
        lid, pid = self._pair(layer_id, parent)
        with contextlib.ExitStack() as stack:
            root = stack.enter_context(self.mounted(lid, readonly=True))
            proot = stack.enter_context(self.mounted(pid, readonly=True)) if pid else None
            return self._naive_changes(root, proot)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Bytes of regular files added or modified against ``parent``, hardlinks counted once."""
        from graphdrivers.archive import changes_size

        lid, pid = self._pair(layer_id, parent)
        with contextlib.ExitStack() as stack:
            root = stack.enter_context(self.mounted(lid, readonly=True))
            proot = stack.enter_context(self.mounted(pid, readonly=True)) if pid else None
            return changes_size(root, self._naive_changes(root, proot))

    def apply_diff(self, layer_id: str, parent: str | None, stream: BinaryIO) -> int:
        """Unpack a layer tar (plain, gzip or zstd) into ``layer_id``; see the module docstring."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        pid = validate_layer_id(parent, self.reserved_ids) if parent is not None else None

        with self.store.lock():
            record = self.store.get(lid)
            if record is None:
                self.create(lid, pid)
            elif record.state is not LayerState.READY:
                raise LayerNotFound(lid)
            elif record.parent != pid:
                raise InvalidOption(
                    f"apply_diff: layer {lid!r} has parent {record.parent!r}, not {pid!r}",
                    layer_id=lid,
                    expected=record.parent,
                    got=pid,
                )
            if self.store.children(lid):
                raise LayerHasChildren(lid, self.store.children(lid))
            self._refuse_if_busy(lid, "apply_diff")

            self.store.set_state(lid, LayerState.APPLYING)
            try:
                size = self._apply(lid, pid, stream)
            except BaseException:
                self._rollback(lid)
                raise
            self.store.set_state(lid, LayerState.READY)
            return size

    def _apply(self, layer_id: LayerId, parent: LayerId | None, stream: BinaryIO) -> int:
        """Unpack ``stream`` into the layer; the naive way applies onto its mountpoint."""
        from graphdrivers.archive import apply_layer

        record = self.store.get(layer_id)
        assert record is not None
        path = self._mount(record, False)
        self._refs[layer_id] = 1
        self._mounts[layer_id] = path
        try:
            return apply_layer(path, stream)
        finally:
            with self._refs_lock:
                self._refs.pop(layer_id, None)
                self._mounts.pop(layer_id, None)
                self._unmount(layer_id)

    def _pair(self, layer_id: str, parent: str | None) -> tuple[LayerId, LayerId | None]:
        lid = validate_layer_id(layer_id, self.reserved_ids)
        self.store.require(lid)
        if parent is None:
            return lid, None
        pid = validate_layer_id(parent, self.reserved_ids)
        self.store.require(pid)
        return lid, pid

    def _naive_changes(self, root: Path, parent_root: Path | None) -> list[Change]:
        from graphdrivers.archive import changes_dirs

        return changes_dirs(root, parent_root)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} home={os.fspath(self.home)!r}>"
