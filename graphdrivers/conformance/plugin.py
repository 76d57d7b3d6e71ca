"""The pytest plugin of the conformance suite (entry point ``graphdrivers_conformance``).

It is loaded by every pytest run in an environment where graphdrivers is installed, so it does
nothing unless asked: it adds its command-line options and, only when ``--gd-driver`` is given,
stores the driver under test where the checks' fixtures find it::

    pytest --gd-driver vfs --pyargs graphdrivers.conformance.checks
    pytest --gd-driver mypkg.mymod:MyDriver --gd-home /mnt/xfs/scratch \\
        --gd-option some.option=1 --pyargs graphdrivers.conformance.checks -k breakout

Options:

``--gd-driver SPEC``
    A built-in driver name or ``package.module:Factory`` (a callable ``(home, options)``).
``--gd-home DIR``
    Make every check's home under DIR (a filesystem of your choice) instead of pytest's
    temporary directory.
``--gd-option KEY=VALUE``
    A driver option, repeatable.

The module imports nothing of graphdrivers until ``--gd-driver`` is given, to keep other test
runs as fast as they were.
"""

from __future__ import annotations

import sys

import pytest

# Module names of the checks, for assertion rewriting and for run().
CHECKS_PACKAGE = "graphdrivers.conformance.checks"

MARKERS = (
    "expect_warnings: the test may log WARNING or worse through a graphdrivers/fusemount logger",
    "slow: takes more than a few seconds",
)

# The name pyproject.toml registers this module under (group pytest11).
ENTRY_POINT_NAME = "graphdrivers_conformance"

pytest.register_assert_rewrite(CHECKS_PACKAGE)


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    # `-p graphdrivers.conformance.plugin` registers this module under its module name before
    # the entry points are loaded; loading it again under the entry point name would fail with
    # "already registered under a different name", so that name is blocked instead.
    if plugin is sys.modules[__name__] and manager.get_name(plugin) != ENTRY_POINT_NAME:
        manager.set_blocked(ENTRY_POINT_NAME)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphdrivers", "graphdrivers conformance suite")
    group.addoption(
        "--gd-driver",
        metavar="SPEC",
        default=None,
        help="driver to run the conformance checks on (name or module:Factory)",
    )
    group.addoption(
        "--gd-home", metavar="DIR", default=None, help="make each check's driver home under DIR"
    )
    group.addoption(
        "--gd-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="driver option for the conformance checks (repeatable)",
    )


def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--gd-driver", default=None)
    if spec is None:
        return

    from graphdrivers.conformance.target import TARGET_KEY, Target, parse_options
    from graphdrivers.errors import InvalidOption

    register_markers(config)
    try:
        target = Target.make(
            spec,
            options=parse_options(config.getoption("--gd-option")),
            home_root=config.getoption("--gd-home"),
        )
    except InvalidOption as exc:
        raise pytest.UsageError(f"--gd-driver {spec}: {exc}") from exc
    config.stash[TARGET_KEY] = target


def pytest_report_header(config: pytest.Config) -> str | None:
    from_stash = _target_label(config)
    return f"graphdrivers conformance: driver {from_stash}" if from_stash else None


def _target_label(config: pytest.Config) -> str | None:
    if config.getoption("--gd-driver", default=None) is None:
        return None
    from graphdrivers.conformance.target import TARGET_KEY

    target = config.stash.get(TARGET_KEY, None)
    return target.label if target is not None else None


def register_markers(config: pytest.Config) -> None:
    """Declare the markers the checks use (idempotent)."""
    for line in MARKERS:
        config.addinivalue_line("markers", line)
