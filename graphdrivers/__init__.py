"""graphdrivers: reference implementations of container graph drivers and their conformance suite.

The public API: :class:`Driver` and its vocabulary (:mod:`graphdrivers.driver`), the error tree
(:mod:`graphdrivers.errors`), and :func:`open_driver` to make a driver by name.
"""

from graphdrivers.driver import Capabilities, Change, Driver, Kind, Status
from graphdrivers.errors import (
    BreakoutError,
    DriverError,
    InvalidArchive,
    InvalidLayerId,
    InvalidOption,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    MountError,
    NotMounted,
    NotSupported,
    ParentNotFound,
    QuotaExceeded,
)
from graphdrivers.ids import LayerId
from graphdrivers.registry import driver_names, open_driver

__version__ = "0.1.0"

__all__ = [
    "BreakoutError",
    "Capabilities",
    "Change",
    "Driver",
    "DriverError",
    "InvalidArchive",
    "InvalidLayerId",
    "InvalidOption",
    "Kind",
    "LayerBusy",
    "LayerExists",
    "LayerHasChildren",
    "LayerId",
    "LayerNotFound",
    "MountError",
    "NotMounted",
    "NotSupported",
    "ParentNotFound",
    "QuotaExceeded",
    "Status",
    "driver_names",
    "open_driver",
]
