"""Driver names and how to make a driver from a name or a ``module:Class`` reference."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

from graphdrivers.driver import Driver
from graphdrivers.errors import InvalidOption

# name -> "module:Class"; a driver joins by adding its line here.
BUILTIN_DRIVERS: dict[str, str] = {
    "vfs": "graphdrivers.drivers.vfs:VfsDriver",
    "overlay": "graphdrivers.drivers.overlay:OverlayDriver",
    "union": "graphdrivers.drivers.union:UnionDriver",
    "devicemapper": "graphdrivers.drivers.devmapper.driver:DevmapperDriver",
    "btrfs": "graphdrivers.drivers.btrfs.driver:BtrfsDriver",
}

DriverFactory = Callable[[Path, Mapping[str, str]], Driver]


def driver_names() -> list[str]:
    """The names of the built-in drivers, in the order ``compare`` and ``doctor`` show them."""
    return list(BUILTIN_DRIVERS)


def resolve_factory(spec: str) -> DriverFactory:
    """A built-in name (``vfs``) or ``package.module:Factory`` -> a callable(home, options)."""
    target = BUILTIN_DRIVERS.get(spec, spec)
    if ":" not in target:
        raise InvalidOption(
            f"unknown driver {spec!r}: use one of {', '.join(driver_names())} "
            "or a 'package.module:Factory' reference"
        )

    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidOption(f"cannot import driver module {module_name!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise InvalidOption(f"module {module_name!r} has no attribute {attr!r}") from exc
    return factory  # type: ignore[no-any-return]


def open_driver(spec: str, home: Path | str, options: Mapping[str, str] | None = None) -> Driver:
    """Make the driver ``spec`` (a name or ``module:Factory``) bound to ``home``."""
    return resolve_factory(spec)(Path(home), dict(options or {}))
