"""``graphdrivers conformance SPEC [--home DIR] [-- PYTEST ARGS]``: run the suite on a driver.

SPEC is a driver name or ``package.module:Factory``. Every check gets a fresh home under
``--home`` (default: a temporary directory). A driver module that needs a special place for
its homes (btrfs needs a btrfs filesystem) may expose ``conformance_home()``, a context manager
yielding such a directory; it is used when ``--home`` is not given. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from graphdrivers.cli.common import Subparsers, driver_options
from graphdrivers.registry import BUILTIN_DRIVERS

log = logging.getLogger(__name__)

HOME_HOOK = "conformance_home"

HomeHook = Callable[[], contextlib.AbstractContextManager[Path]]


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "conformance",
        parents=[common],
        help="run the conformance suite",
        description="Run the conformance suite against driver SPEC.",
    )
    p.add_argument("spec", metavar="SPEC", help="driver name or package.module:Factory")
    # Arguments after "--" are split off before parsing (see main.split_pytest_args).
    p.set_defaults(func=run, pytest_args=[])


@contextlib.contextmanager
def home_root_for(spec: str, home: str | None) -> Iterator[Path | None]:
    """``--home`` if given, else the driver module's ``conformance_home()``, else None."""
    if home is not None:
        yield Path(home)
        return
    hook = find_home_hook(spec)
    if hook is None:
        yield None
        return
    log.info("using %s.%s() for the homes", spec, HOME_HOOK)
    with hook() as root:
        yield Path(root)


def find_home_hook(spec: str) -> HomeHook | None:
    """The ``conformance_home`` callable of the module that defines driver ``spec``, if any."""
    target = BUILTIN_DRIVERS.get(spec, spec)
    module_name = target.partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    hook = getattr(module, HOME_HOOK, None)
    return cast(HomeHook, hook) if callable(hook) else None


def run(args: argparse.Namespace) -> int:
    from graphdrivers import conformance

    with home_root_for(args.spec, args.home) as root:
        return conformance.run(  # type: ignore[attr-defined, no-any-return]
            args.spec,
            home_root=root,
            pytest_args=tuple(args.pytest_args),
            options=driver_options(args),
        )
