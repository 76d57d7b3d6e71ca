"""The devicemapper driver: every layer is a thin device, a block-level snapshot of its parent.

All layers share one thin pool. A *base* device gets an ext4 filesystem once; a layer without
a parent is a snapshot of the base, and a child is a snapshot of its parent's device, made in
O(1) whatever the parent holds: blocks are shared until one side writes them. ``get`` activates
the layer's device and mounts its filesystem; the layer's tree is the ``rootfs`` directory in it,
so the filesystem's own ``lost+found`` stays out of the layer.

Two pool backends sit behind the driver (option ``dm.backend``): ``kernel`` sends the pool
messages to the kernel's dm-thin through dmsetup (:mod:`.kernel`); ``userspace`` runs the pool
in Python in dm-thin's own format and gives the kernel its devices through FUSE and loop devices
(:mod:`.userspace`). ``auto`` (the default) takes the kernel where it has the thin-pool target.

On-disk layout (the store's part is drawn in :mod:`graphdrivers.store`)::

    HOME/
    ├── devicemapper/               POOL_DIR
    │   ├── data, metadata          the pool (sparse files unless dm.datadev/dm.metadatadev)
    │   ├── mnt/thin-<dev id>       userspace backend: the daemon's device files
    │   ├── base.img                scratch ext4 image of the base device, while it is made
    │   └── pool.lock, daemon.pid, daemon.log
    ├── metadata/                   DEVICES_DIR
    │   ├── base                    DeviceRecord of the base device
    │   ├── <id>.device             DeviceRecord: device_id, size, transaction_id, initialized
    │   ├── deviceset-metadata      next_device_id, base filesystem, pool: the settings the
    │   │                           home was made with (sizes, block size, devices, mkfs args)
    │   └── transaction-metadata    open_transaction_id, device_id: the pool message under way
    └── mnt/<id>/                   MOUNTS_DIR: the mounted filesystem; the layer is rootfs/

Crash safety follows moby's devicemapper: before a pool message the driver records an open
transaction (the pool's transaction id + 1 and the device id), then sends the message, writes
the device record, and closes the transaction with ``set_transaction_id``. A driver opened after
a crash finds the transaction still open and rolls it back: the half-made device is deleted from
the pool. The store's layer records then remove the layer itself.

The pool options (``dm.loopdatasize``, ``dm.loopmetadatasize``, ``dm.blocksize``,
``dm.datadev``, ``dm.metadatadev``, ``dm.mkfsarg``) take effect when the home is made and are
recorded in ``deviceset-metadata``; a later open without them uses the home's own, and one that
contradicts them is refused with InvalidOption. ``dm.basesize`` may grow (new layers without a
parent get the bigger device, as moby's ``growFS``); asking for a smaller one is refused.

Limitations:

- A parent that is mounted while a child is created is frozen (FIFREEZE) around the snapshot, so
  the child gets a consistent filesystem; writes to the parent wait meanwhile.
- The userspace backend serves every block through Python and FUSE: fine for tests and learning,
  slow for real images (see docs/devicemapper.md for the figures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

from graphdrivers.driver import Capabilities, Driver
from graphdrivers.drivers.devmapper.baseimage import ROOTFS_DIR, make_ext4_image
from graphdrivers.errors import (
    DriverError,
    InvalidOption,
    MountError,
    NotSupported,
    QuotaExceeded,
)
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.ids import LayerId
from graphdrivers.store import LayerRecord, atomic_write, make_private_dir
from graphdrivers.thinpool.errors import DeviceNotFound, ThinPoolError

log = logging.getLogger(__name__)

POOL_DIR = "devicemapper"
DATA_FILE = "data"
METADATA_FILE = "metadata"
DEVICES_DIR = "metadata"
MOUNTS_DIR = "mnt"
BASE_RECORD = "base"
DEVICESET_FILE = "deviceset-metadata"
TRANSACTION_FILE = "transaction-metadata"
BASE_DEVICE_ID = 0
DEVICE_SUFFIX = ".device"
BASE_IMAGE_FILE = "base.img"

DEFAULT_BASE_SIZE = 10 * 1024**3
DEFAULT_DATA_SIZE = 100 * 1024**3
DEFAULT_METADATA_SIZE = 2 * 1024**3
DEFAULT_BLOCK_SECTORS = 128
METADATA_BLOCK_SIZE = 4096
#: deviceset-metadata keys of the settings a home was made with
POOL_SETTINGS_KEY = "pool"
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
#: option -> key in the recorded pool settings, for those compared as sizes
_SIZE_OPTIONS = {
    "dm.loopdatasize": "data_size",
    "dm.loopmetadatasize": "metadata_size",
}
#: option -> key in the recorded pool settings, for those compared as text
_TEXT_OPTIONS = {"dm.datadev": "datadev", "dm.metadatadev": "metadatadev", "dm.mkfsarg": "mkfsarg"}


def parse_size(text: str, what: str) -> int:
    """``"10G"`` -> bytes; InvalidOption naming ``what`` otherwise."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    number, suffix = (value[:-1], value[-1]) if value and value[-1] in "kmgt" else (value, "")
    try:
        size = int(float(number) * _SIZE_SUFFIXES[suffix])
    except ValueError as exc:
        raise InvalidOption(f"{what}={text!r} is not a size (like 512M or 10G)") from exc
    if size <= 0:
        raise InvalidOption(f"{what}={text!r} must be positive")
    return size


def format_size(size: int) -> str:
    """Bytes -> the shortest exact option text (``"64M"``), as a user would write it."""
    for suffix in "TGMK":
        unit = _SIZE_SUFFIXES[suffix.lower()]
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_block_sectors(text: str) -> int:
    """``dm.blocksize`` (``"64K"``) -> 512-byte sectors, as the pool records its block size."""
    size = parse_size(text, "dm.blocksize")
    if size % 512:
        raise InvalidOption(f"dm.blocksize={text!r} is not a multiple of 512 bytes")
    return size // 512


class PoolBackend(Protocol):
    """What the driver needs of a thin pool, whoever runs it."""

    name: str

    def message(self, text: str) -> None: ...
    def transaction_id(self) -> int: ...
    def devices(self) -> set[int]: ...
    def activate(self, dev_id: int, size: int) -> Path: ...
    def deactivate(self, dev_id: int) -> None: ...
    def write_image(self, dev_id: int, size: int, image: Path) -> None: ...
    def status(self) -> dict[str, str]: ...
    def shutdown(self) -> None: ...


@dataclasses.dataclass
class DeviceRecord:
    """What the driver records of a layer's thin device (``HOME/metadata/<id>``)."""

    device_id: int
    size: int
    transaction_id: int
    initialized: bool = True


class DevmapperDriver(Driver):
    """Layers as thin devices in one pool (see the module docstring)."""

    name = "devicemapper"
    known_options: ClassVar[frozenset[str]] = frozenset(
        {
            "dm.backend",
            "dm.basesize",
            "dm.loopdatasize",
            "dm.loopmetadatasize",
            "dm.datadev",
            "dm.metadatadev",
            "dm.blocksize",
            "dm.mkfsarg",
        }
    )
    known_storage_opts = frozenset({"size"})

    # ----------------------------------------------------------------- set-up

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise NotSupported(
                "privilege root (losetup, mount and mkfs need it)",
                hint="run as root",
                driver=self.name,
            )
        for tool in ("losetup", "mount", "umount", "mkfs.ext4", "resize2fs"):
            if shutil.which(tool) is None:
                raise NotSupported(
                    f"tool {tool}", hint="apt-get install util-linux e2fsprogs", driver=self.name
                )
        backend = self.options.get("dm.backend", "auto")
        if backend not in ("auto", "kernel", "userspace"):
            raise InvalidOption(f"dm.backend={backend!r}: use auto, kernel or userspace")
        if backend == "kernel":
            from graphdrivers.drivers.devmapper.kernel import check_kernel_thin_pool

            check_kernel_thin_pool()
        elif backend == "userspace":
            self._check_userspace()

    def _check_userspace(self) -> None:
        if not Path("/dev/fuse").exists():
            raise NotSupported(
                "kernel filesystem fuse (/dev/fuse)", hint="modprobe fuse", driver=self.name
            )
        if shutil.which("fusermount3") is None:
            raise NotSupported("tool fusermount3", hint="apt-get install fuse3", driver=self.name)
        if not Path("/dev/loop-control").exists():
            raise NotSupported(
                "kernel loop devices (/dev/loop-control)", hint="modprobe loop", driver=self.name
            )

    def _init_home(self) -> None:
        self.pool_dir = self.home / POOL_DIR
        self.devices_dir = self.home / DEVICES_DIR
        self.mounts_dir = self.home / MOUNTS_DIR
        for path in (self.pool_dir, self.devices_dir, self.mounts_dir):
            make_private_dir(path)
        recorded = self._deviceset().get(POOL_SETTINGS_KEY)
        base = self._device(BASE_RECORD, internal=True)
        if recorded is not None:
            self._refuse_contradictions(recorded, base)
        requested = self._requested_settings(recorded)
        self.base_size = requested["base_size"]
        if base is not None and "dm.basesize" not in self.options:
            self.base_size = base.size  # the home's own, grown or not
        self.backend = self._make_backend(requested)
        self._frozen: set[LayerId] = set()
        try:
            self._open_pool(recorded, base)
        except BaseException:
            self.backend.shutdown()
            raise

    def _open_pool(self, recorded: dict[str, Any] | None, base: DeviceRecord | None) -> None:
        """Recover, make the base device of a new home, grow it if asked; record the settings."""
        self._roll_back_open_transaction()
        if recorded is None:  # a new home, or one made before settings were recorded
            recorded = self._settings_from_pool(self._requested_settings(None))
            if base is not None and base.initialized:
                self._refuse_contradictions(recorded, base)
        self._init_base_device()
        base = self._device(BASE_RECORD, internal=True)
        assert base is not None
        if self.base_size > base.size:
            self._grow_base_device(base, self.base_size)
        self._save_settings({**recorded, "base_size": self.base_size})

    def _requested_settings(self, recorded: dict[str, Any] | None) -> dict[str, Any]:
        """The pool settings the options ask for; the recorded (or default) ones where unset."""
        opts = self.options
        defaults: dict[str, Any] = recorded or {
            "base_size": DEFAULT_BASE_SIZE,
            "data_size": DEFAULT_DATA_SIZE,
            "metadata_size": DEFAULT_METADATA_SIZE,
            "block_sectors": DEFAULT_BLOCK_SECTORS,
            "datadev": "",
            "metadatadev": "",
            "mkfsarg": "",
        }
        settings = dict(defaults)
        for option, key in {"dm.basesize": "base_size", **_SIZE_OPTIONS}.items():
            if option in opts:
                settings[key] = parse_size(opts[option], option)
        if "dm.blocksize" in opts:
            settings["block_sectors"] = parse_block_sectors(opts["dm.blocksize"])
        for option, key in _TEXT_OPTIONS.items():
            settings[key] = opts.get(option, settings[key])
        return settings

    def _refuse_contradictions(self, recorded: dict[str, Any], base: DeviceRecord | None) -> None:
        """InvalidOption for an option this existing home cannot take (a bigger base is fine)."""
        wanted = self._requested_settings(recorded)
        base_size = base.size if base is not None else recorded["base_size"]
        problems = []
        if wanted["base_size"] < base_size:
            problems.append(
                f"dm.basesize={self.options['dm.basesize']} is smaller than the home's base "
                f"device ({format_size(base_size)}); it can only grow"
            )
        for option, key in (*_SIZE_OPTIONS.items(), ("dm.blocksize", "block_sectors")):
            if option in self.options and wanted[key] != recorded[key]:
                had = recorded[key] * 512 if key == "block_sectors" else recorded[key]
                problems.append(
                    f"{option}={self.options[option]} (the home has {format_size(had)})"
                )
        for option, key in _TEXT_OPTIONS.items():
            if option in self.options and wanted[key] != recorded[key]:
                problems.append(
                    f"{option}={self.options[option]!r} (the home has {recorded[key]!r})"
                )
        if problems:
            raise InvalidOption(
                f"devicemapper home {self.home} was made with {_describe(recorded, base_size)}; "
                f"it cannot take {'; '.join(problems)}. Open it without these options, or give "
                "a new home directory to make a pool with them"
            )

    def _settings_from_pool(self, requested: dict[str, Any]) -> dict[str, Any]:
        """The settings of the pool as it is: sizes read from the pool, the rest as asked."""
        status = self.backend.status()
        block_sectors = int(status.get("Data Block Size (sectors)", requested["block_sectors"]))
        data_blocks = int(status["Data Blocks Used/Total"].split("/")[1])
        meta_blocks = int(status["Metadata Blocks Used/Total"].split("/")[1])
        return {
            **requested,
            "data_size": data_blocks * block_sectors * 512,
            "metadata_size": meta_blocks * METADATA_BLOCK_SIZE,
            "block_sectors": block_sectors,
        }

    def _save_settings(self, settings: dict[str, Any]) -> None:
        deviceset = self._deviceset()
        if deviceset.get(POOL_SETTINGS_KEY) == settings:
            return
        deviceset[POOL_SETTINGS_KEY] = settings
        atomic_write(
            self._record_path(DEVICESET_FILE, internal=True), json.dumps(deviceset).encode()
        )

    def _make_backend(self, settings: dict[str, Any]) -> PoolBackend:
        data = Path(settings["datadev"]) if settings["datadev"] else self.pool_dir / DATA_FILE
        meta = (
            Path(settings["metadatadev"])
            if settings["metadatadev"]
            else self.pool_dir / METADATA_FILE
        )
        if not data.exists():
            self._warn_if_bigger_than_disk(data, settings["data_size"])
        sizes: dict[str, Any] = {
            "data_size": settings["data_size"],
            "metadata_size": settings["metadata_size"],
            "block_sectors": settings["block_sectors"],
        }
        choice = self.options.get("dm.backend", "auto")
        if choice in ("auto", "kernel"):
            from graphdrivers.drivers.devmapper.kernel import KernelBackend

            try:
                return KernelBackend(self.pool_dir, meta, data, **sizes)
            except NotSupported:
                if choice == "kernel":
                    raise
                log.debug("no kernel dm-thin here: using the userspace pool")
                self._check_userspace()
        from graphdrivers.drivers.devmapper.userspace import UserspaceBackend

        return UserspaceBackend(self.pool_dir, meta, data, **sizes)

    def _warn_if_bigger_than_disk(self, data: Path, size: int) -> None:
        """Say so, once, when a new sparse data file could outgrow the filesystem it is on."""
        free = shutil.disk_usage(data.parent).free
        if size > free:
            log.warning(
                "the pool's data file %s is a sparse %s, but its filesystem has only %s free: "
                "writes to layers can fill the disk before the pool is full; set the size with "
                "dm.loopdatasize (or give a device with dm.datadev)",
                data,
                format_size(size),
                format_size(free - free % 1024**2),
            )

    # ----------------------------------------------------------------- device records

    def _record_path(self, name: str, *, internal: bool = False) -> Path:
        """A layer's record is ``<id>.device``; the driver's own files have no suffix."""
        return self.devices_dir / (name if internal else f"{name}{DEVICE_SUFFIX}")

    def _device(self, name: str, *, internal: bool = False) -> DeviceRecord | None:
        try:
            text = self._record_path(name, internal=internal).read_text()
        except FileNotFoundError:
            return None
        return DeviceRecord(**json.loads(text))

    def _save_device(self, name: str, record: DeviceRecord, *, internal: bool = False) -> None:
        atomic_write(
            self._record_path(name, internal=internal),
            json.dumps(dataclasses.asdict(record)).encode(),
        )

    def _deviceset(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(
                self._record_path(DEVICESET_FILE, internal=True).read_text()
            )
        except FileNotFoundError:
            data = {"next_device_id": BASE_DEVICE_ID + 1, "base_fs": "ext4"}
        return data

    def _allocate_device_id(self) -> int:
        deviceset = self._deviceset()
        dev_id = int(deviceset["next_device_id"])
        deviceset["next_device_id"] = dev_id + 1
        atomic_write(
            self._record_path(DEVICESET_FILE, internal=True), json.dumps(deviceset).encode()
        )
        return dev_id

    @contextlib.contextmanager
    def _transaction(self, dev_id: int, name: str) -> Iterator[int]:
        """Open a pool transaction around a message; closed only if the body completes."""
        current = self.backend.transaction_id()
        record = {
            "open_transaction_id": current + 1,
            "device_id": dev_id,
            "name": name,
            "internal": name == BASE_RECORD and dev_id == BASE_DEVICE_ID,
        }
        atomic_write(
            self._record_path(TRANSACTION_FILE, internal=True), json.dumps(record).encode()
        )
        yield current + 1
        self.backend.message(f"set_transaction_id {current} {current + 1}")

    def _roll_back_open_transaction(self) -> None:
        try:
            record = json.loads(self._record_path(TRANSACTION_FILE, internal=True).read_text())
        except FileNotFoundError:
            return
        current = self.backend.transaction_id()
        if record["open_transaction_id"] <= current:
            return

        dev_id, name = int(record["device_id"]), str(record["name"])
        internal = bool(record.get("internal"))
        log.info(
            "rolling back pool transaction %d (device %d of %s)",
            record["open_transaction_id"],
            dev_id,
            name,
        )
        saved = self._device(name, internal=internal)
        if saved is not None and saved.device_id == dev_id:
            self._record_path(name, internal=internal).unlink()
        with contextlib.suppress(DeviceNotFound):
            self.backend.message(f"delete {dev_id}")
        self.backend.message(f"set_transaction_id {current} {record['open_transaction_id']}")

    def _init_base_device(self) -> None:
        base = self._device(BASE_RECORD, internal=True)
        if base is not None and base.initialized:
            return
        if base is not None:  # a crash while making the filesystem: start again
            with contextlib.suppress(DeviceNotFound):
                self.backend.message(f"delete {base.device_id}")

        with self._transaction(BASE_DEVICE_ID, BASE_RECORD) as tid:
            self.backend.message(f"create_thin {BASE_DEVICE_ID}")
            self._save_device(
                BASE_RECORD,
                DeviceRecord(BASE_DEVICE_ID, self.base_size, tid, initialized=False),
                internal=True,
            )
        self._make_base_filesystem()
        self._save_device(
            BASE_RECORD,
            DeviceRecord(BASE_DEVICE_ID, self.base_size, self.backend.transaction_id()),
            internal=True,
        )

    def _grow_base_device(self, base: DeviceRecord, size: int) -> None:
        """Grow the base device and its ext4 to ``size``: new layers without a parent get it.

        The record says ``initialized=False`` while the filesystem grows, so a crash midway
        leaves a base device that the next open deletes and makes afresh at the asked size
        (layers are snapshots: they do not need their origin).
        """
        self._save_device(
            BASE_RECORD, dataclasses.replace(base, size=size, initialized=False), internal=True
        )
        self._grow_filesystem(LayerId(BASE_RECORD), BASE_DEVICE_ID, size)
        self._save_device(
            BASE_RECORD, dataclasses.replace(base, size=size, initialized=True), internal=True
        )
        log.info("grew the base device from %d to %d bytes", base.size, size)

    def _make_base_filesystem(self) -> None:
        """ext4 with an empty ``rootfs``, made on a scratch file and copied into the device."""
        image = self.pool_dir / BASE_IMAGE_FILE
        try:
            recorded = self._deviceset().get(POOL_SETTINGS_KEY)
            mkfs_args = self._requested_settings(recorded)["mkfsarg"].split()
            make_ext4_image(image, self.base_size, mkfs_args)
            self.backend.write_image(BASE_DEVICE_ID, self.base_size, image)
        finally:
            image.unlink(missing_ok=True)
        log.info("made the ext4 base device (%d bytes)", self.base_size)

    # ----------------------------------------------------------------- storage hooks

    def _create_layer(self, record: LayerRecord) -> None:
        if record.parent is None:
            origin = self._device(BASE_RECORD, internal=True)
        else:
            origin = self._device(record.parent)
        if origin is None:
            raise DriverError(
                f"no device record for the parent of {record.id!r}", layer_id=record.id
            )
        size = origin.size
        if "size" in record.storage_opt:
            size = parse_size(record.storage_opt["size"], "size")
            if size < origin.size:
                raise InvalidOption(
                    f"size={record.storage_opt['size']} is smaller than the parent's device "
                    f"({origin.size} bytes); devicemapper layers can only grow",
                    layer_id=record.id,
                )

        dev_id = self._allocate_device_id()
        with self._frozen_parent(record.parent), self._transaction(dev_id, record.id) as tid:
            self.backend.message(f"create_snap {dev_id} {origin.device_id}")
            self._save_device(record.id, DeviceRecord(dev_id, size, tid))
        if size > origin.size:
            self._grow_filesystem(record.id, dev_id, size)

    @contextlib.contextmanager
    def _frozen_parent(self, parent: LayerId | None) -> Iterator[None]:
        """Freeze a mounted parent's filesystem so that its snapshot is consistent."""
        if parent is None or self._refs.get(parent, 0) == 0:
            yield
            return
        fd = os.open(self.mounts_dir / parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
            try:
                yield
            finally:
                fcntl.ioctl(fd, FITHAW, 0)
        finally:
            os.close(fd)

    def _grow_filesystem(self, layer_id: LayerId, dev_id: int, size: int) -> None:
        device = self.backend.activate(dev_id, size)
        try:
            _run(["e2fsck", "-f", "-y", str(device)], "checking before a resize", ok=(0, 1))
            _run(["resize2fs", str(device)], f"growing the filesystem of {layer_id}")
        finally:
            self.backend.deactivate(dev_id)

    def _remove_layer(self, layer_id: LayerId) -> None:
        target = self.mounts_dir / layer_id
        if any(m.target == target.resolve() for m in mounts_under(self.mounts_dir)):
            _run(["umount", str(target)], f"unmounting {layer_id} left mounted")
        record = self._device(layer_id)
        if record is not None:
            self.backend.deactivate(record.device_id)
            with self._transaction(record.device_id, layer_id):
                with contextlib.suppress(DeviceNotFound):
                    self.backend.message(f"delete {record.device_id}")
                self._record_path(layer_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()

    def _mount(self, record: LayerRecord, readonly: bool) -> Path:
        device_record = self._device(record.id)
        if device_record is None:
            raise DriverError(f"layer {record.id!r} has no device record", layer_id=record.id)
        target = self.mounts_dir / record.id
        target.mkdir(mode=0o700, exist_ok=True)
        device = self.backend.activate(device_record.device_id, device_record.size)
        try:
            options = "ro" if readonly else "rw"
            _run(
                ["mount", "-t", "ext4", "-o", options, str(device), str(target)],
                f"mounting layer {record.id}",
            )
        except BaseException:
            self.backend.deactivate(device_record.device_id)
            raise
        return target / ROOTFS_DIR

    def _unmount(self, layer_id: LayerId) -> None:
        target = self.mounts_dir / layer_id
        _run(["umount", str(target)], f"unmounting layer {layer_id}")
        record = self._device(layer_id)
        if record is not None:
            self.backend.deactivate(record.device_id)
        with contextlib.suppress(OSError):
            target.rmdir()

    def _mount_present(self, layer_id: LayerId) -> bool | None:
        target = (self.mounts_dir / layer_id).resolve()
        return any(m.target == target for m in mounts_under(self.mounts_dir))

    def _cleanup(self) -> None:
        for mount in mounts_under(self.mounts_dir):
            if mount.target != self.mounts_dir.resolve():
                subprocess.run(["umount", str(mount.target)], capture_output=True)
        try:
            self.backend.shutdown()
        except (DriverError, ThinPoolError, OSError) as exc:
            raise MountError(f"devicemapper cleanup: {exc}") from exc

    def abort_hung_pool(self) -> None:
        """Cut the FUSE connection of a hung userspace pool daemon (writers then fail)."""
        from graphdrivers.drivers.devmapper.userspace import UserspaceBackend

        if isinstance(self.backend, UserspaceBackend):
            self.backend.abort_daemon()

    def _metadata(self, record: LayerRecord) -> dict[str, str]:
        device = self._device(record.id)
        if device is None:
            return {}
        return {
            "DeviceId": str(device.device_id),
            "DeviceSize": str(device.size),
            "DeviceName": f"thin-{device.device_id}",
            "MountDir": str(self.mounts_dir / record.id / ROOTFS_DIR),
        }

    def _status_extra(self) -> dict[str, str]:
        extra = dict(self.backend.status())
        base = self._device(BASE_RECORD, internal=True)
        settings = self._deviceset().get(POOL_SETTINGS_KEY, {})
        extra["Base Device Size"] = str(base.size if base is not None else self.base_size)
        extra["Backing Filesystem"] = "ext4"
        if settings:
            extra["Data Space Total"] = str(settings["data_size"])
            extra["Metadata Space Total"] = str(settings["metadata_size"])
        if not settings.get("datadev"):
            extra["Data loop file"] = "sparse file (the easy, slow set-up; dm.datadev is faster)"
        return extra

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_diff=False, reproducible_diff=True, quota=True, supports_devices=True
        )


def _describe(settings: dict[str, Any], base_size: int) -> str:
    """The options that would make a home like the one ``settings`` records."""
    words = [
        f"dm.basesize={format_size(base_size)}",
        f"dm.loopdatasize={format_size(settings['data_size'])}",
        f"dm.loopmetadatasize={format_size(settings['metadata_size'])}",
        f"dm.blocksize={format_size(settings['block_sectors'] * 512)}",
    ]
    words += [f"{opt}={settings[key]!r}" for opt, key in _TEXT_OPTIONS.items() if settings[key]]
    return " ".join(words)


def _run(args: list[str], what: str, ok: tuple[int, ...] = (0,)) -> None:
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode not in ok:
        message = (run.stderr or run.stdout).strip()
        if "No space left" in message:
            raise QuotaExceeded(f"{what}: {message}")
        raise MountError(f"{what}: {' '.join(args)} failed: {message}")


def remove_pool_files(home: Path) -> None:
    """Delete a devicemapper home's pool files (for tests and tools that start afresh)."""
    remove_tree(home / POOL_DIR)


def conformance_verify(home: Path) -> list[str]:
    """The conformance suite's check of a home after each scenario (see :mod:`.verify`)."""
    from graphdrivers.drivers.devmapper.verify import verify_home

    return verify_home(home)
