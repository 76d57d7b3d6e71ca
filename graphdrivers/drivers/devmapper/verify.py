"""Is a devicemapper home consistent? The conformance suite asks after every check.

Once every driver on a home is cleaned up, the pool in it must be at rest and whole:

- no pool daemon is left running;
- ``thin_check`` and our own recount (:func:`graphdrivers.thinpool.check.check_pool`) pass
  the metadata, and the mappings ``thin_dump`` reads (and ``thin_ls`` counts) equal the pool's
  own view of them (:func:`graphdrivers.thinpool.tools.verify_pool`);
- the pool holds exactly the thin devices the driver has records for: the base device and one
  per layer. A pool transaction left open by a killed process may add (or have already
  deleted) its one device, which the next driver to open the home rolls back.

:func:`verify_home` returns the problems found, an empty list when the home is clean. It reads
only the default pool files (``dm.datadev``/``dm.metadatadev`` pools are not looked at).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from graphdrivers.drivers.devmapper.driver import (
    BASE_RECORD,
    DATA_FILE,
    DEVICE_SUFFIX,
    DEVICES_DIR,
    METADATA_FILE,
    POOL_DIR,
    TRANSACTION_FILE,
)
from graphdrivers.drivers.devmapper.userspace import DAEMON_PID_FILE
from graphdrivers.thinpool import ThinPool
from graphdrivers.thinpool.tools import ToolMissing, verify_pool

log = logging.getLogger(__name__)


def verify_home(home: Path) -> list[str]:
    """The problems of the pool and device records in a cleaned-up devicemapper home."""
    pool_dir = home / POOL_DIR
    metadata, data = pool_dir / METADATA_FILE, pool_dir / DATA_FILE
    if not metadata.exists():
        return []  # no driver got as far as making a pool here
    problems = _daemon_left(pool_dir)
    try:
        problems += verify_pool(metadata, data)
    except ToolMissing as exc:
        return [str(exc)]
    if problems:
        return problems

    with ThinPool.open(metadata, data) as pool:
        in_pool, transaction_id = set(pool.devices()), pool.status().transaction_id
    recorded, pending = _recorded_devices(home / DEVICES_DIR, transaction_id)
    extra = in_pool - recorded - pending
    missing = recorded - in_pool
    if extra:
        problems.append(f"pool devices without a driver record: {sorted(extra)}")
    if missing:
        problems.append(f"driver records of devices not in the pool: {sorted(missing)}")
    return problems


def _daemon_left(pool_dir: Path) -> list[str]:
    try:
        pid = int((pool_dir / DAEMON_PID_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return []
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    if b"fusemount.thindev" in cmdline and str(pool_dir).encode() in cmdline:
        return [f"pool daemon {pid} still runs after cleanup"]
    return []


def _recorded_devices(devices_dir: Path, transaction_id: int) -> tuple[set[int], set[int]]:
    """(device ids the driver's records name, the device of a transaction left open)."""
    recorded = {
        int(json.loads(p.read_text())["device_id"]) for p in devices_dir.glob(f"*{DEVICE_SUFFIX}")
    }
    base = devices_dir / BASE_RECORD
    if base.exists():
        recorded.add(int(json.loads(base.read_text())["device_id"]))
    pending: set[int] = set()
    transaction = devices_dir / TRANSACTION_FILE
    if transaction.exists():
        record = json.loads(transaction.read_text())
        if int(record["open_transaction_id"]) > transaction_id:
            pending.add(int(record["device_id"]))
            recorded.discard(int(record["device_id"]))
    return recorded, pending
