"""Makes the suite's fixtures and markers available to every check in this package."""

from __future__ import annotations

import pytest

from graphdrivers.conformance.fixtures import caps, driver, gd_case, gd_target

__all__ = ["caps", "driver", "gd_case", "gd_target"]


def pytest_configure(config: pytest.Config) -> None:
    from graphdrivers.conformance.plugin import register_markers

    register_markers(config)
