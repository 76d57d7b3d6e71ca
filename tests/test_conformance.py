"""The conformance suite on every driver of ours, and proof that it finds what it looks for.

Every check of :mod:`graphdrivers.conformance.checks` is collected here once per driver in
:data:`CONFORMANCE_DRIVERS` (test ids end in ``[vfs]``, ``[overlay]``...). A driver joins by
adding its line to that table. A driver module that needs its homes on a particular
filesystem (btrfs) exposes ``conformance_home()``, a context manager yielding a directory there,
the same hook ``graphdrivers conformance`` uses.

The second half runs the suite on deliberately broken drivers (subclasses of the vfs driver
that lose setuid bits, drop xattrs, leave out the parent-dir Modify, or unpack tars naively)
and asserts that exactly the checks meant to catch each fault fail, while the real vfs driver
passes the same selection.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from graphdrivers.cli.conformance import find_home_hook
from graphdrivers.conformance import Report, run_report
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
from graphdrivers.driver import Change, Kind
from graphdrivers.drivers.vfs import VfsDriver
from graphdrivers.errors import NotSupported
from graphdrivers.ids import LayerId
from graphdrivers.store import LayerRecord

# The drivers the whole suite runs on in `pytest tests/`: test id -> (registry name, options).
# A driver joins by adding its line.
CONFORMANCE_DRIVERS: dict[str, tuple[str, dict[str, str]]] = {
    "vfs": ("vfs", {}),
    "union-overlay": ("union", {"whiteout": "overlay"}),
    "union-aufs": ("union", {"whiteout": "aufs"}),
    "overlay": ("overlay", {}),
    "devicemapper": (
        "devicemapper",
        {
            "dm.backend": "userspace",
            "dm.basesize": "256M",
            "dm.loopdatasize": "2G",
            "dm.loopmetadatasize": "32M",
        },
    ),
    # Homes on the loopback btrfs the module's conformance_home() makes; both diff paths.
    "btrfs": ("btrfs", {}),
    "btrfs-naive": ("btrfs", {"btrfs.diff": "naive"}),
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


@pytest.fixture(scope="module", params=sorted(CONFORMANCE_DRIVERS))
def gd_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Each driver of ours in turn, with its homes where its module wants them."""
    spec, options = CONFORMANCE_DRIVERS[request.param]
    hook = find_home_hook(spec)
    with contextlib.ExitStack() as stack:
        try:
            root = stack.enter_context(hook()) if hook is not None else None
        except NotSupported as exc:
            pytest.skip(f"{spec} needs {exc.missing}")
        yield Target.make(spec, options=options, home_root=root)


# ------------------------------------------------------------------ deliberately broken drivers


class LosesSetuid(VfsDriver):
    """Copies a parent, then clears setuid and setgid bits (a copy that chmods before chown)."""

    def _create_layer(self, record: LayerRecord) -> None:
        super()._create_layer(record)
        for path in _tree(self.layer_path(record.id)):
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


class DropsUserXattrs(VfsDriver):
    """Copies a parent without its user.* xattrs (moby's vfs copy keeps only capabilities)."""

    def _create_layer(self, record: LayerRecord) -> None:
        super()._create_layer(record)
        for path in _tree(self.layer_path(record.id)):
            for name in os.listxattr(path, follow_symlinks=False):
                if name.startswith("user."):
                    os.removexattr(path, name, follow_symlinks=False)


class NoParentModify(VfsDriver):
    """Reports changes without the Modify of a directory that has changes below it."""

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        found = super().changes(layer_id, parent)
        paths = {c.path for c in found}
        return [
            c
            for c in found
            if not (c.kind is Kind.MODIFY and any(p.startswith(c.path + "/") for p in paths))
        ]


class NaiveExtract(VfsDriver):
    """Unpacks layer tars with tarfile's unchecked extraction (follows links out of the root)."""

    def _apply(self, layer_id: LayerId, parent: LayerId | None, stream: BinaryIO) -> int:
        record = self.store.get(layer_id)
        assert record is not None
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            tar.extractall(self._mount(record, False), filter="fully_trusted")
        return 0


def _tree(root: Path) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            yield Path(dirpath) / name


def _run(factory: Any, tmp_path: Path, select: str) -> Report:
    """The suite on ``factory``, only the checks ``select`` (a -k expression) names."""
    report = run_report(
        factory,
        home_root=tmp_path / "homes",
        pytest_args=[
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            os.fspath(tmp_path / "basetemp"),
            "-k",
            select,
        ],
    )
    assert report.outcomes, f"no check matched {select!r}"
    return report


NAIVE_EXTRACT_CASES = (
    "dotdot-overwrite",
    "symlink-then-write",
    "dir-over-symlink-then-write",
    "lower-symlink-then-write",
    "hardlink-to-symlink-then-write",
    "hardlink-out-absolute",
    "two-hop-symlink",
    "two-hop-symlink-nested",
    "wh-bare",
    "dir-wh-bare",
    "whiteout-under-symlink",
    "whiteout-under-lower-symlink",
)

# (fault, -k selection, checks that must fail, checks of the selection that must pass)
FAULTS = {
    "loses-setuid": (
        LosesSetuid,
        "create_base or create_snapshot or special_bits",
        {"test_create_snapshot", "test_snapshot_keeps[special_bits]"},
        {"test_create_base", "test_layer_keeps[special_bits]"},
    ),
    "drops-user-xattrs": (
        DropsUserXattrs,
        "snapshot_keeps and (user_xattrs or regular)",
        {"test_snapshot_keeps[user_xattrs]"},
        {"test_snapshot_keeps[regular]"},
    ),
    "no-parent-modify": (
        NoParentModify,
        "changes_exact or changes_echo or changes_links",
        {"test_changes_exact", *(f"test_changes_echo[{d}]" for d in range(1, 10))},
        {"test_changes_echo[0]", "test_changes_links"},
    ),
    # Named exactly (a -k name ending in "]" matches one check): naive extraction really
    # follows these entries, and each of them only reaches the check's own victim directory.
    "naive-extract": (
        NaiveExtract,
        " or ".join(f"test_breakout[{case}]" for case in NAIVE_EXTRACT_CASES),
        {f"test_breakout[{case}]" for case in NAIVE_EXTRACT_CASES},
        set(),
    ),
}


@pytest.mark.expect_warnings
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_suite_catches(tmp_path: Path, fault: str) -> None:
    """A driver with one fault fails exactly the checks aimed at it; vfs passes them all."""
    factory, select, must_fail, must_pass = FAULTS[fault]

    broken = _run(factory, tmp_path / "broken", select)
    assert set(broken.failed) == must_fail, (
        f"{fault}: failed {broken.failed}, expected {sorted(must_fail)}"
    )
    assert must_pass <= set(broken.passed), f"{fault}: passed {broken.passed}"
    assert broken.exit_code == pytest.ExitCode.TESTS_FAILED

    control = _run(VfsDriver, tmp_path / "control", select)
    assert control.failed == [], f"vfs fails {control.failed}"
    assert set(control.passed) >= must_fail | must_pass
    assert control.exit_code == pytest.ExitCode.OK
