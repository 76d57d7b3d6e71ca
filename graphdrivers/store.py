"""The per-driver layer store: one record per layer, written atomically, under one lock.

Every driver keeps its bookkeeping in the same place inside its home, whatever it does with the
layer contents::

    HOME/                       0710, owned by the user running the driver
    ├── lock                    flock(2) target: held exclusively for every change to the store
    ├── layers/                 0700
    │   └── <id>.json           LayerRecord: parent, state, rw, storage options, creation time
    ├── staging/                0700, scratch space a driver may use (emptied at start-up)
    └── ...                     the driver's own directories (vfs: dir/<id>, btrfs: subvolumes/)

A record is written to a temporary file, fsync'ed and renamed over the old one, and the directory
is fsync'ed, so after a crash every record is whole. A record's ``state`` says how far a
multi-step operation got: a layer is ``creating`` from before its storage is made until it is
complete, ``applying`` while a layer tar is unpacked into it, and ``removing`` from before its
storage is deleted. :meth:`LayerStore.unfinished` lists the records a crash left in a transient
state so that the driver can roll them back at start-up: each layer is whole or absent.

The lock is an ``flock`` on ``HOME/lock``, so two processes using one home serialise their
changes; within one process a re-entrant thread lock does the same for threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graphdrivers.errors import DriverError, LayerNotFound
from graphdrivers.ids import LayerId

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
LAYERS_DIR = "layers"
STAGING_DIR = "staging"
RECORD_SUFFIX = ".json"
HOME_MODE = 0o710
PRIVATE_MODE = 0o700


class LayerState(enum.StrEnum):
    """How far a layer's multi-step operation got (see the module docstring)."""

    CREATING = "creating"
    APPLYING = "applying"
    READY = "ready"
    REMOVING = "removing"


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What the store knows of one layer."""

    id: LayerId
    parent: LayerId | None
    state: LayerState
    rw: bool = False
    storage_opt: dict[str, str] = dataclasses.field(default_factory=dict)
    created: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerRecord:
        data = json.loads(text)
        return cls(
            id=LayerId(data["id"]),
            parent=LayerId(data["parent"]) if data.get("parent") else None,
            state=LayerState(data["state"]),
            rw=bool(data.get("rw", False)),
            storage_opt=dict(data.get("storage_opt") or {}),
            created=float(data.get("created", 0.0)),
            extra=dict(data.get("extra") or {}),
        )


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and unlinks inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path, mode: int = PRIVATE_MODE) -> None:
    """Create ``path`` (and parents) if missing and force its mode, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


class LayerStore:
    """Layer records under ``home/layers`` and the lock that guards them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.layers_dir = home / LAYERS_DIR
        self.staging_dir = home / STAGING_DIR
        make_private_dir(home, HOME_MODE)
        make_private_dir(self.layers_dir)
        make_private_dir(self.staging_dir)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store exclusively: across processes (flock) and threads (RLock)."""
        with self._thread_lock:
            if self._depth == 0:
                fd = os.open(self.home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    def _path(self, layer_id: str) -> Path:
        return self.layers_dir / f"{layer_id}{RECORD_SUFFIX}"

    def get(self, layer_id: LayerId) -> LayerRecord | None:
        """The record of ``layer_id``, or None if there is none."""
        try:
            text = self._path(layer_id).read_text()
        except FileNotFoundError:
            return None

        try:
            return LayerRecord.from_json(text)
        except (ValueError, KeyError) as exc:
            raise DriverError(
                f"layer record {self._path(layer_id)} is corrupt ({exc}); "
                "remove the file to forget the layer",
                layer_id=layer_id,
                path=self._path(layer_id),
            ) from exc

    def require(self, layer_id: LayerId) -> LayerRecord:
        """The record of a complete layer, or :class:`LayerNotFound`."""
        record = self.get(layer_id)
        if record is None or record.state is not LayerState.READY:
            raise LayerNotFound(layer_id)
        return record

    def put(self, record: LayerRecord) -> None:
        """Write (or replace) a record atomically."""
        atomic_write(self._path(record.id), record.to_json().encode())

    def set_state(self, layer_id: LayerId, state: LayerState) -> LayerRecord:
        record = self.get(layer_id)
        if record is None:
            raise LayerNotFound(layer_id)
        new = dataclasses.replace(record, state=state)
        self.put(new)
        return new

    def new_record(
        self,
        layer_id: LayerId,
        parent: LayerId | None,
        *,
        rw: bool = False,
        storage_opt: dict[str, str] | None = None,
    ) -> LayerRecord:
        """Write the ``creating`` record that precedes any storage a new layer gets."""
        record = LayerRecord(
            id=layer_id,
            parent=parent,
            state=LayerState.CREATING,
            rw=rw,
            storage_opt=dict(storage_opt or {}),
            created=time.time(),
        )
        self.put(record)
        return record

    def delete(self, layer_id: LayerId) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(layer_id).unlink()
        fsync_dir(self.layers_dir)

    def records(self) -> list[LayerRecord]:
        """Every record, in any state, sorted by id."""
        out = []
        for entry in sorted(os.listdir(self.layers_dir)):
            if entry.startswith(".") or not entry.endswith(RECORD_SUFFIX):
                continue
            record = self.get(LayerId(entry[: -len(RECORD_SUFFIX)]))
            if record is not None:
                out.append(record)
        return out

    def ready(self) -> list[LayerRecord]:
        return [r for r in self.records() if r.state is LayerState.READY]

    def children(self, layer_id: LayerId) -> list[LayerId]:
        """Ids of the records (in any state) whose parent is ``layer_id``."""
        return [r.id for r in self.records() if r.parent == layer_id]

    def unfinished(self) -> list[LayerRecord]:
        """Records a crash left mid-operation, children before parents."""
        transient = [r for r in self.records() if r.state is not LayerState.READY]
        return order_children_first(transient)

    def clear_staging(self) -> None:
        """Remove leftovers in ``staging/`` (only call with the lock held at start-up)."""
        from graphdrivers.fsutil.remove import remove_tree

        for entry in os.listdir(self.staging_dir):
            remove_tree(self.staging_dir / entry)


def order_children_first(records: list[LayerRecord]) -> list[LayerRecord]:
    """Sort records so that every layer comes before its parent (ties by id)."""
    by_id = {r.id: r for r in records}
    depth: dict[LayerId, int] = {}

    def depth_of(layer_id: LayerId) -> int:
        seen = []
        current: LayerId | None = layer_id
        while current is not None and current in by_id and current not in depth:
            seen.append(current)
            current = by_id[current].parent
            if len(seen) > len(by_id):  # a cycle: corrupt records, do not loop for ever
                break
        base = depth.get(current, -1) if current is not None else -1
        for i, item in enumerate(reversed(seen)):
            depth[item] = base + 1 + i
        return depth[layer_id]

    return sorted(records, key=lambda r: (-depth_of(r.id), r.id))
