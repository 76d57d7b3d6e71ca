"""Project-wide test policy (kept small; no driver-specific fixtures here).

- A WARNING or worse logged through a ``graphdrivers`` or ``fusemount`` logger fails the test
  that logged it, unless the test is marked ``@pytest.mark.expect_warnings``.
- Nothing may stay mounted under pytest's temporary directory once the run ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator

import pytest

WATCHED_LOGGERS = ("graphdrivers", "fusemount")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_warnings: the test may log WARNING or worse through a graphdrivers/fusemount "
        "logger",
    )


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _fail_on_logged_warnings(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if our code logged a warning during it (setup, call or teardown)."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)

    if handler.records and request.node.get_closest_marker("expect_warnings") is None:
        lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in handler.records]
        pytest.fail(
            "logged warnings (mark the test @pytest.mark.expect_warnings if they are "
            "expected):\n" + "\n".join(lines),
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run, nothing may be mounted under the tests' temporary directory."""
    yield
    from graphdrivers.fsutil.fstype import mounts_under

    left = mounts_under(tmp_path_factory.getbasetemp())
    for entry in left:  # deepest first; unmount so that the machine is left clean
        subprocess.run(["umount", "-l", os.fspath(entry.target)], check=False, capture_output=True)
    if left:
        pytest.fail(
            "left mounted after the test run: "
            + ", ".join(f"{e.target} ({e.fstype})" for e in left),
            pytrace=False,
        )
