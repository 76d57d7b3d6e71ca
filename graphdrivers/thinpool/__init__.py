"""A userspace thin pool that keeps its metadata in the kernel's dm-thin on-disk format.

Usable without any driver: :class:`ThinPool` takes the kernel target's messages
(``create_thin``, ``create_snap``, ``delete``, ``set_transaction_id``) and :class:`ThinDevice`
reads and writes one thin device. ``thin_check`` and the kernel read what it writes.
"""

from graphdrivers.thinpool.errors import (
    DeviceExists,
    DeviceNotFound,
    MetadataCorrupt,
    NoSpace,
    ThinPoolError,
    TransactionMismatch,
)
from graphdrivers.thinpool.pool import PoolStatus, ThinDevice, ThinPool

__all__ = [
    "DeviceExists",
    "DeviceNotFound",
    "MetadataCorrupt",
    "NoSpace",
    "PoolStatus",
    "ThinDevice",
    "ThinPool",
    "ThinPoolError",
    "TransactionMismatch",
]
