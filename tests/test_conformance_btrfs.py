"""The whole conformance suite on the btrfs driver, on a loopback btrfs of its own.

The same checks :mod:`test_conformance` collects for the other drivers, collected here for btrfs
twice: with its default generation-based ``changes`` (``[btrfs]``) and with the generic naive
walk (``[btrfs-naive]``), so that both diff paths are held to the contract. The homes live on the
loopback btrfs that the driver module's ``conformance_home()`` makes and removes, the hook
``graphdrivers conformance btrfs`` uses. Needs root, the btrfs and loop kernel modules and
mkfs.btrfs; a missing one skips with its name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from graphdrivers.cli.conformance import find_home_hook
from graphdrivers.conformance.checks import (
    test_breakout,
    test_changes,
    test_concurrency,
    test_content,
    test_crash,
    test_diff,
    test_errors,
    test_lifecycle,
    test_mounts,
)
from graphdrivers.conformance.fixtures import caps, driver, gd_case
from graphdrivers.conformance.target import Target
from graphdrivers.errors import NotSupported

# test id -> driver options
BTRFS_TARGETS: dict[str, dict[str, str]] = {
    "btrfs": {},
    "btrfs-naive": {"btrfs.diff": "naive"},
}

CHECK_MODULES = (
    test_lifecycle,
    test_content,
    test_diff,
    test_changes,
    test_mounts,
    test_errors,
    test_breakout,
    test_crash,
    test_concurrency,
)

for _module in CHECK_MODULES:
    globals().update(
        {n: f for n, f in vars(_module).items() if n.startswith("test_") and callable(f)}
    )

__all__ = ["caps", "driver", "gd_case"]


@pytest.fixture(scope="module", params=sorted(BTRFS_TARGETS))
def gd_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The btrfs driver with each option set, its homes on a loopback btrfs."""
    hook = find_home_hook("btrfs")
    assert hook is not None, "the btrfs driver module lost its conformance_home hook"
    try:
        home = hook()
        root = home.__enter__()
    except NotSupported as exc:
        pytest.skip(exc.missing)
    try:
        yield Target.make("btrfs", options=BTRFS_TARGETS[request.param], home_root=root)
    finally:
        home.__exit__(None, None, None)
