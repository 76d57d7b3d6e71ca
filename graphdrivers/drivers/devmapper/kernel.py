"""The kernel pool backend: the same pool messages sent to the kernel's dm-thin through dmsetup.

Where the kernel has device-mapper with the thin-pool target, the pool is a real dm device
made from the data and metadata devices (loop devices over the files, or block devices given
with ``dm.datadev``/``dm.metadatadev``)::

    dmsetup create POOL --table "0 <data sectors> thin-pool <meta dev> <data dev> \\
                                 <block sectors> 32768 1 skip_block_zeroing"
    dmsetup message POOL 0 "create_snap 5 3"
    dmsetup create POOL-5 --table "0 <size sectors> thin /dev/mapper/POOL 5"

The metadata is the same format the userspace backend writes, so a pool made by either can be
opened by the other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from graphdrivers.drivers.devmapper.baseimage import copy_extents
from graphdrivers.errors import MountError, NotSupported
from graphdrivers.thinpool import ThinPool
from graphdrivers.thinpool.errors import DeviceExists, DeviceNotFound, ThinPoolError
from graphdrivers.thinpool.messages import parse_message

log = logging.getLogger(__name__)

MAPPER_CONTROL = Path("/dev/mapper/control")
LOW_WATER_MARK = 32768


def check_kernel_thin_pool() -> None:
    """Raise NotSupported unless dmsetup and the kernel's thin-pool target are usable."""
    if not MAPPER_CONTROL.exists():  # first: without it, dmsetup would not help
        raise NotSupported(
            "kernel device-mapper (/dev/mapper/control)",
            hint="a kernel with CONFIG_BLK_DEV_DM, then modprobe dm_mod; "
            "or use dm.backend=userspace",
            driver="devicemapper",
        )
    if shutil.which("dmsetup") is None:
        raise NotSupported("tool dmsetup", hint="apt-get install dmsetup", driver="devicemapper")
    run = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True)
    if "thin-pool" not in run.stdout:
        raise NotSupported(
            "kernel target thin-pool", hint="modprobe dm_thin_pool", driver="devicemapper"
        )


def _dmsetup(*args: str) -> str:
    run = subprocess.run(["dmsetup", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise MountError(f"dmsetup {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout


class KernelBackend:
    """A dm-thin pool in the kernel, driven by dmsetup."""

    name = "kernel"

    def __init__(
        self,
        pool_dir: Path,
        metadata: Path,
        data: Path,
        *,
        data_size: int,
        metadata_size: int,
        block_sectors: int,
    ) -> None:
        check_kernel_thin_pool()
        self.pool_dir = pool_dir
        digest = hashlib.sha256(str(pool_dir.resolve()).encode()).hexdigest()[:12]
        self.pool_name = f"graphdrivers-{digest}-pool"
        self.block_sectors = block_sectors
        self._loops: list[str] = []

        for path, size in ((data, data_size), (metadata, metadata_size)):
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(size)
        with open(metadata, "rb") as f:
            if not any(f.read(4096)):
                ThinPool.format(metadata, data, data_block_size=block_sectors).close()
        if not Path(f"/dev/mapper/{self.pool_name}").exists():
            meta_dev, data_dev = self._block_device(metadata), self._block_device(data)
            sectors = int(
                subprocess.run(
                    ["blockdev", "--getsz", data_dev], check=True, capture_output=True, text=True
                ).stdout
            )
            table = (
                f"0 {sectors} thin-pool {meta_dev} {data_dev} {block_sectors} "
                f"{LOW_WATER_MARK} 1 skip_block_zeroing"
            )
            _dmsetup("create", self.pool_name, "--table", table)

    def _block_device(self, path: Path) -> str:
        if path.is_block_device():
            return str(path)
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self._loops.append(loop)
        return loop

    def message(self, text: str) -> None:
        verb, args = parse_message(text)
        origin = f"/dev/mapper/{self.pool_name}-{args[1]}" if verb == "create_snap" else ""
        suspended = bool(origin) and os.path.exists(origin)
        if suspended:  # the kernel snapshots a consistent origin only while it is suspended
            _dmsetup("suspend", origin)
        try:
            _dmsetup("message", self.pool_name, "0", text)
        except MountError as exc:
            if "File exists" in str(exc):
                raise DeviceExists(text) from exc
            if "No data available" in str(exc) or "No such" in str(exc):
                raise DeviceNotFound(text) from exc
            raise ThinPoolError(str(exc)) from exc
        finally:
            if suspended:
                _dmsetup("resume", origin)

    def _status_fields(self) -> list[str]:
        return _dmsetup("status", self.pool_name).split()

    def transaction_id(self) -> int:
        return int(self._status_fields()[3])

    def devices(self) -> set[int]:
        # The kernel keeps no list of devices it will report; the driver's records are it.
        # Limitation: recovery of a half-made device relies on the driver's transaction record.
        return set()

    def status(self) -> dict[str, str]:
        fields = self._status_fields()
        return {
            "Pool Backend": self.name,
            "Pool Name": self.pool_name,
            "Transaction Id": fields[3],
            "Metadata Blocks Used/Total": fields[4],
            "Data Blocks Used/Total": fields[5],
        }

    def activate(self, dev_id: int, size: int) -> Path:
        name = f"{self.pool_name}-{dev_id}"
        table = f"0 {size // 512} thin /dev/mapper/{self.pool_name} {dev_id}"
        _dmsetup("create", name, "--table", table)
        return Path(f"/dev/mapper/{name}")

    def write_image(self, dev_id: int, size: int, image: Path) -> None:
        """Copy the data extents of the file ``image`` into a thin device of ``size`` bytes."""
        device = self.activate(dev_id, size)
        try:
            fd = os.open(device, os.O_WRONLY)
            try:
                copy_extents(image, lambda data, offset: os.pwrite(fd, data, offset))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            self.deactivate(dev_id)

    def deactivate(self, dev_id: int) -> None:
        name = f"{self.pool_name}-{dev_id}"
        if Path(f"/dev/mapper/{name}").exists():
            _dmsetup("remove", "--retry", name)

    def shutdown(self) -> None:
        for entry in Path("/dev/mapper").glob(f"{self.pool_name}-*"):
            _dmsetup("remove", "--retry", entry.name)
        if Path(f"/dev/mapper/{self.pool_name}").exists():
            _dmsetup("remove", "--retry", self.pool_name)
        for loop in self._loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        self._loops.clear()
