"""The driver under test: how to make it, with which options, and where its homes go.

A :class:`Target` is what the pytest plugin, :func:`graphdrivers.conformance.run` and the
project's own tests hand to the checks. It is made from a registry spec (``vfs``,
``mypkg.mymod:MyDriver``) or from a callable ``factory(home, options) -> driver``. Only a spec can
be handed to another process, so the checks that kill a process in the middle of an operation
(:mod:`graphdrivers.conformance.checks.test_crash`) skip for a target made from a callable.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

# Where pytest_configure leaves the target for the fixtures to find.
TARGET_KEY = pytest.StashKey["Target"]()

Factory = Callable[[Path, Mapping[str, str]], Any]


@dataclasses.dataclass(frozen=True)
class Target:
    """A driver factory plus what the suite needs to know to run it."""

    factory: Factory
    spec: str | None = None
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    home_root: Path | None = None

    @classmethod
    def make(
        cls,
        driver: str | Factory,
        *,
        options: Mapping[str, str] | None = None,
        home_root: Path | str | None = None,
    ) -> Target:
        """A target from a registry spec string or a factory callable."""
        from graphdrivers.registry import resolve_factory

        root = Path(home_root).absolute() if home_root is not None else None
        if isinstance(driver, str):
            return cls(resolve_factory(driver), driver, dict(options or {}), root)
        if not callable(driver):
            raise TypeError(f"driver must be a spec string or a callable, not {driver!r}")
        return cls(driver, None, dict(options or {}), root)

    @property
    def label(self) -> str:
        """How reports name the driver."""
        if self.spec is not None:
            return self.spec
        return getattr(self.factory, "__qualname__", repr(self.factory))

    def open(self, home: Path) -> Any:
        """A driver bound to ``home`` (may raise NotSupported)."""
        return self.factory(home, dict(self.options))

    def module_hook(self, name: str) -> Callable[..., Any] | None:
        """The callable ``name`` of the module that defines the driver's factory, if any.

        The suite looks for ``conformance_verify(home) -> list[str]`` there: a driver that can
        check its home's on-disk state (devicemapper runs thin_check on its pool) is asked to
        after every check, once its drivers are cleaned up; each string is a problem.
        """
        module = sys.modules.get(getattr(self.factory, "__module__", "") or "")
        hook = getattr(module, name, None)
        return hook if callable(hook) else None


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` from the command line -> a dict; a pair without ``=`` is an error."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--gd-option wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out
