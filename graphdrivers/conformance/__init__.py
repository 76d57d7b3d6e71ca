"""The conformance suite: one set of checks every graph driver must pass.

Run it on a driver from Python::

    from graphdrivers import conformance
    exit_code = conformance.run("vfs")                       # a built-in driver
    exit_code = conformance.run("mypkg.mymod:MyDriver", home_root=Path("/mnt/xfs"))
    report = conformance.run_report(MyDriver, pytest_args=["-k", "breakout"])
    report.failed                                             # ["test_breakout[wh-bare]", ...]

from pytest (the plugin ``graphdrivers_conformance``, see :mod:`.plugin`)::

    pytest --gd-driver vfs --pyargs graphdrivers.conformance.checks

or from the command line: ``graphdrivers conformance mypkg.mymod:MyDriver``.

The driver is a registry spec (``vfs``, ``package.module:Factory``) or a callable
``factory(home: Path, options: Mapping[str, str])`` returning a driver. Every check gets a fresh
home (under ``home_root`` when given). A driver that raises
:class:`~graphdrivers.errors.NotSupported` from its constructor makes every check skip with the
missing thing as the reason. The checks that kill a process mid-operation open the driver in
that process from its spec, so they skip when the driver is given as a callable.

Modules: :mod:`.checks` (the checks, one module per area), :mod:`.fixtures` (fresh driver,
fresh home, teardown checks), :mod:`.manifest` (tree manifests and their diffs),
:mod:`.corpus` (every file type and attribute), :mod:`.tars` (hand-made layer tars),
:mod:`.worker` (the subprocess side of the crash checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from graphdrivers.conformance.plugin import CHECKS_PACKAGE
from graphdrivers.conformance.target import TARGET_KEY, Factory, Target

__all__ = ["CHECKS_PACKAGE", "Report", "Target", "run", "run_report"]


@dataclasses.dataclass
class Report:
    """What a run of the suite gave: pytest's exit code and each check's outcome."""

    exit_code: int
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)

    def with_outcome(self, outcome: str) -> list[str]:
        return sorted(name for name, got in self.outcomes.items() if got == outcome)

    @property
    def failed(self) -> list[str]:
        return self.with_outcome("failed")

    @property
    def passed(self) -> list[str]:
        return self.with_outcome("passed")

    @property
    def skipped(self) -> list[str]:
        return self.with_outcome("skipped")


class _RunPlugin:
    """Hands the target to the checks and records every check's outcome."""

    def __init__(self, target: Target, report: Report) -> None:
        self.target = target
        self.report = report

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        from graphdrivers.conformance.plugin import register_markers

        register_markers(config)
        config.stash[TARGET_KEY] = self.target

    def pytest_report_header(self) -> str:
        return f"graphdrivers conformance: driver {self.target.label}"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = report.nodeid.rpartition("::")[2]
        counts = report.when == "call" or report.outcome != "passed"
        if counts and self.report.outcomes.get(name) != "failed":
            self.report.outcomes[name] = report.outcome


def run_report(
    driver: str | Factory,
    *,
    home_root: Path | None = None,
    pytest_args: Sequence[str] = (),
    options: Mapping[str, str] | None = None,
) -> Report:
    """Run every check on ``driver`` under pytest and say how each one went."""
    target = Target.make(driver, options=options, home_root=home_root)
    report = Report(exit_code=-1)
    args = ["--pyargs", CHECKS_PACKAGE, *pytest_args]
    report.exit_code = int(pytest.main(args, plugins=[_RunPlugin(target, report)]))
    return report


def run(
    driver: str | Factory,
    *,
    home_root: Path | None = None,
    pytest_args: Sequence[str] = (),
    options: Mapping[str, str] | None = None,
) -> int:
    """Run every check on ``driver`` under pytest; returns pytest's exit code (0: all passed)."""
    return run_report(
        driver, home_root=home_root, pytest_args=pytest_args, options=options
    ).exit_code
