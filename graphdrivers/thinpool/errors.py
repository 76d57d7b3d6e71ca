"""Errors of the userspace thin pool (it knows nothing of drivers; the driver maps these)."""

from __future__ import annotations


class ThinPoolError(Exception):
    """Root of the thin pool's errors."""


class MetadataCorrupt(ThinPoolError):
    """A metadata block fails its checksum, names another location, or breaks the format."""


class NoSpace(ThinPoolError):
    """The data or metadata device has no free block left."""


class DeviceExists(ThinPoolError):
    """A create message named a device id that is in use."""


class DeviceNotFound(ThinPoolError):
    """A message or open named a device id the pool does not have."""


class TransactionMismatch(ThinPoolError):
    """set_transaction_id's current id is not the pool's (the compare of compare-and-swap)."""
