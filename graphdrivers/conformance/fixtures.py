"""The fixtures every check uses: a fresh driver on a fresh home, torn down and checked after.

Each check gets a :class:`Case`: a new directory (under the target's ``home_root`` when one was
given, else under pytest's temporary directory) holding::

    CASE/
    ├── home/       the driver's home
    └── victim/     made by the breakout checks: a tree no layer operation may touch

:meth:`Case.open` makes a driver on the home (or on another directory); a driver whose
construction raises :class:`~graphdrivers.errors.NotSupported` skips the check with the missing
thing as the reason. When the check ends, every driver it opened is cleaned up, and anything
still mounted under the case directory fails the check (after being unmounted, so that no mount
outlives the test run). Then, if the driver's module has ``conformance_verify(home)``, each home
is handed to it and every problem it returns fails the check.

The ``gd_target`` fixture says which driver runs. Here it reads what the plugin or
:func:`graphdrivers.conformance.run` stored in the config; a test module that runs the checks
on drivers of its own overrides it (``tests/test_conformance.py`` parametrizes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.target import TARGET_KEY, Target
from graphdrivers.errors import NotSupported
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.fsutil.remove import remove_tree

log = logging.getLogger(__name__)

HOME_DIR = "home"
VICTIM_DIR = "victim"
VERIFY_HOOK = "conformance_verify"


@dataclasses.dataclass
class Case:
    """One check's sandbox and the drivers opened in it."""

    target: Target
    dir: Path
    drivers: list[Any] = dataclasses.field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.dir / HOME_DIR

    @property
    def victim(self) -> Path:
        return self.dir / VICTIM_DIR

    def open(self, home: Path | None = None) -> Any:
        """A new driver on ``home`` (default: the case's home); skips if the host can't run it."""
        try:
            driver = self.target.open(home or self.home)
        except NotSupported as exc:
            pytest.skip(exc.missing)
        self.drivers.append(driver)
        return driver

    def close(self) -> None:
        """Clean up every driver, then make sure nothing is left mounted under the case."""
        errors = []
        homes = list(dict.fromkeys(Path(d.home) for d in self.drivers if hasattr(d, "home")))
        for driver in reversed(self.drivers):
            try:
                driver.cleanup()
            except Exception as exc:
                errors.append(f"{driver!r}.cleanup() raised {exc!r}")
        self.drivers.clear()

        left = mounts_under(self.dir)
        for entry in left:  # deepest first: unmount so that no mount outlives the run
            subprocess.run(
                ["umount", "-l", os.fspath(entry.target)], check=False, capture_output=True
            )
        if left:
            errors.append(
                "still mounted under the case directory after cleanup(): "
                + ", ".join(f"{e.target} ({e.fstype})" for e in left)
            )
        verify = self.target.module_hook(VERIFY_HOOK)
        if verify is not None and not errors:
            for home in homes:
                errors += [f"{home}: {problem}" for problem in verify(home)]
        if errors:
            raise AssertionError("; ".join(errors))


def _case_dir(target: Target, factory: pytest.TempPathFactory) -> Path:
    if target.home_root is not None:
        target.home_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="case-", dir=target.home_root))
    return factory.mktemp("case")


@pytest.fixture
def gd_target(request: pytest.FixtureRequest) -> Target:
    """The driver under test, as the plugin or run() configured it."""
    target = request.config.stash.get(TARGET_KEY, None)
    if target is None:
        pytest.fail(
            "no driver to test: pass --gd-driver SPEC (pytest plugin graphdrivers_conformance) "
            "or call graphdrivers.conformance.run(SPEC)",
            pytrace=False,
        )
    return target


@pytest.fixture
def gd_case(gd_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    """A fresh case directory for one check, torn down (and checked) afterwards."""
    case = Case(gd_target, _case_dir(gd_target, tmp_path_factory))
    try:
        yield case
    finally:
        try:
            case.close()
        finally:
            with contextlib.suppress(OSError):
                remove_tree(case.dir)


@pytest.fixture
def driver(gd_case: Case) -> Any:
    """A fresh driver on a fresh home."""
    return gd_case.open()


@pytest.fixture
def caps(driver: Any) -> Any:
    """The capabilities of the driver under test."""
    return driver.capabilities()
