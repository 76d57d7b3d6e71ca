"""``graphdrivers doctor [--json]``: which backends this host can run, and what is missing.

For every registered driver, and by name for the backends the project plans but that are not
registered here yet, doctor:

- checks the host facts the backend needs (:mod:`graphdrivers.hostcheck`): kernel filesystem
  or device-mapper target, device nodes, tools, Python modules, privilege, and the backing
  filesystem of the home (``--home``, or each driver's default home);
- for a registered driver, opens it in a scratch home on the same filesystem as its home and
  reports what the driver itself says (its NotSupported names the missing thing);
- warns about combinations known to be slow or fragile.

A missing thing comes with how to get it (Debian package, ``modprobe``, run as root). The exit
status is 0 whatever the verdicts: doctor reports, it does not fail.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphdrivers import hostcheck
from graphdrivers.cli.common import Subparsers, default_home, driver_options, print_json
from graphdrivers.errors import DriverError, NotSupported
from graphdrivers.fsutil.fstype import filesystem_type
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.registry import driver_names, open_driver

log = logging.getLogger(__name__)

# Backends doctor explains even before their driver is registered on this installation.
PLANNED = ("vfs", "union", "overlay", "btrfs", "devicemapper")


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="which backends can run on this host",
        description="Check which drivers this host can run and what is missing.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


@dataclasses.dataclass
class Report:
    """doctor's verdict on one backend."""

    driver: str
    registered: bool
    available: bool
    verdict: str
    home: str
    backing_filesystem: str
    missing: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)
    checks: list[dict[str, object]] = dataclasses.field(default_factory=list)
    variants: dict[str, list[dict[str, object]]] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def probe_home(home: Path) -> Iterator[Path]:
    """A scratch directory on the filesystem ``home`` is (or would be) on, removed after."""
    near = hostcheck.existing_ancestor(home)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".graphdrivers-doctor-", dir=near))
    except OSError:
        scratch = Path(tempfile.mkdtemp(prefix="graphdrivers-doctor-"))
    try:
        yield scratch / "home"
    finally:
        remove_tree(scratch)


def probe(name: str, home: Path, options: dict[str, str]) -> NotSupported | DriverError | None:
    """Open driver ``name`` in a scratch home: None if it works, else the error it raised."""
    with probe_home(home) as scratch:
        try:
            driver = open_driver(name, scratch, options)
        except NotSupported as exc:
            # Speak of the user's home, not of the scratch directory the probe made beside it.
            def real(text: str) -> str:
                return text.replace(str(scratch), str(home)).replace(
                    str(scratch.parent), str(hostcheck.existing_ancestor(home))
                )

            return NotSupported(real(exc.missing), hint=real(exc.hint), driver=exc.driver)
        except DriverError as exc:
            return exc
        try:
            driver.cleanup()
        except DriverError as exc:
            log.warning("doctor: cleanup of probe %s failed: %s", name, exc)
    return None


def examine(name: str, home: Path, registered: bool, options: dict[str, str]) -> Report:
    req = hostcheck.driver_requirements(name, home)
    report = Report(
        driver=name,
        registered=registered,
        available=False,
        verdict="",
        home=str(home),
        backing_filesystem=filesystem_type(hostcheck.existing_ancestor(home)),
    )
    if req is not None:
        report.checks = [c.as_dict() for c in req.checks]
        report.variants = {k: [c.as_dict() for c in v] for k, v in req.variants.items()}
        report.warnings = list(req.warnings)
        for check in req.missing():
            report.missing.append(f"{check.what} ({check.detail})" if check.detail else check.what)
            if check.hint and check.hint not in report.hints:
                report.hints.append(check.hint)

    if registered:
        _verdict_from_probe(report, probe(name, home, options))
    else:
        host_ok = req is not None and req.ok
        report.verdict = (
            "planned, not registered here; this host has what it needs"
            if host_ok
            else "planned, not registered here; this host lacks: "
            + "; ".join(report.missing or ["unknown requirements"])
        )
    if req is not None and req.variants and req.ok:
        usable = [k for k, v in req.variants.items() if all(c.ok for c in v)]
        report.verdict += f" (usable backend: {', '.join(usable)})"
    return report


def _verdict_from_probe(report: Report, error: DriverError | None) -> None:
    if error is None:
        report.available = True
        report.verdict = "available"
    elif isinstance(error, NotSupported):
        report.verdict = f"not available: missing {error.missing}"
        if error.missing not in " ".join(report.missing):
            report.missing.insert(0, error.missing)
        if error.hint and not any(h in error.hint or error.hint in h for h in report.hints):
            report.hints.insert(0, error.hint)
    else:
        report.verdict = f"error: {error}"


def run(args: argparse.Namespace) -> int:
    registered = driver_names()
    names = registered + [n for n in PLANNED if n not in registered]
    options = driver_options(args)
    reports = []
    for name in names:
        home = Path(args.home) if args.home else default_home(name)
        reports.append(
            examine(name, home, name in registered, options if name == args.driver else {})
        )

    if args.json:
        print_json([dataclasses.asdict(r) for r in reports])
        return 0
    for line in render(reports, every_check=bool(args.verbose)):
        print(line)
    return 0


def _check_line(check: dict[str, object]) -> str:
    mark = "ok" if check["ok"] else "MISSING"
    return f"{mark:<7} {check['what']}: {check['detail']}"


def render(reports: list[Report], *, every_check: bool = False) -> list[str]:
    """Human output: a verdict line per backend, then what is missing, fixes and warnings.

    With ``every_check`` (``-v``) every host fact is listed, passing or not.
    """
    width = max(len(r.driver) for r in reports)
    pad = " " * width
    lines = []
    for r in reports:
        lines.append(f"{r.driver:<{width}}  {r.verdict}")
        lines.append(f"{pad}  home {r.home} (on {r.backing_filesystem})")
        for item in r.missing:
            lines.append(f"{pad}  missing: {item}")
        for hint in r.hints:
            lines.append(f"{pad}  fix: {hint}")
        for variant, checks in r.variants.items():
            lacking = [str(c["what"]) for c in checks if not c["ok"]]
            if lacking:
                lines.append(f"{pad}  {variant} backend unusable: missing {', '.join(lacking)}")
        for warning in r.warnings:
            lines.append(f"{pad}  warning: {warning}")
        if every_check:
            lines += [f"{pad}    {_check_line(c)}" for c in r.checks]
            for variant, checks in r.variants.items():
                lines += [f"{pad}    [{variant}] {_check_line(c)}" for c in checks]
    return lines
