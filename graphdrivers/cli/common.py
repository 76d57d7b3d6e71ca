"""What every verb of the command line shares: exit codes, driver opening, output, progress.

Exit codes (the same table is in :mod:`graphdrivers.cli.main` and docs/cli.md):

====  =========================================================================
code  meaning
====  =========================================================================
0     success
1     any other :class:`~graphdrivers.errors.DriverError` (MountError, QuotaExceeded...)
2     usage error: bad arguments, or binary output refused on a terminal
3     LayerNotFound, ParentNotFound
4     LayerExists
5     LayerBusy, LayerHasChildren, NotMounted
6     InvalidArchive, BreakoutError
7     NotSupported (this host lacks something the driver needs)
8     InvalidLayerId, InvalidOption
130   interrupted (Ctrl-C)
====  =========================================================================

Mounts that outlive the process: a CLI process ends after one verb, and a driver's reference
counts live in its process. ``graphdrivers mount ID`` therefore leaves the layer mounted and
writes a *CLI mount record* (``HOME/cli-mounts.json``: layer id -> mountpoint, readonly flag,
the layer's creation time); ``graphdrivers umount ID`` in a later process finds the record,
asks the driver to undo the mount and deletes the record. The look-up, the mount and the
record happen under the store lock, so two ``mount`` commands at once mount a layer once.
``rm`` and ``apply`` (the verbs that rewrite or remove a layer) refuse a layer that has a
record. Records are checked whenever they are read: one whose layer is gone (or was made
again) or whose mount is gone is dropped with an info log, so a stale record cannot wedge
the home. Other verbs release the mounts they made themselves, and call
:meth:`Driver.cleanup` (which unmounts everything under the home) only while no CLI mount
record exists.

Limitation: a verb that mounts a layer ``graphdrivers mount`` already mounted (``diff`` or
``changes`` of it, where the driver has no native diff) mounts it again in its own process:
union-style drivers replace the earlier mount then, and the record is dropped as stale once
that verb's unmount leaves nothing mounted; devicemapper refuses (LayerBusy, exit 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

from graphdrivers.driver import Driver
from graphdrivers.errors import (
    BreakoutError,
    DriverError,
    InvalidArchive,
    InvalidLayerId,
    InvalidOption,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    NotMounted,
    NotSupported,
    ParentNotFound,
)
from graphdrivers.ids import LayerId, validate_layer_id
from graphdrivers.registry import open_driver
from graphdrivers.store import LayerState, atomic_write

log = logging.getLogger(__name__)

# What argparse's add_subparsers() returns; each verb module's register() takes it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

PROG = "graphdrivers"
DEFAULT_DRIVER = "vfs"
CLI_MOUNTS_FILE = "cli-mounts.json"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_BUSY = 5
EXIT_ARCHIVE = 6
EXIT_NOT_SUPPORTED = 7
EXIT_INVALID = 8
EXIT_INTERRUPTED = 130

# Most specific first: BreakoutError is an InvalidArchive, every one is a DriverError.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (LayerNotFound, EXIT_NOT_FOUND),
    (ParentNotFound, EXIT_NOT_FOUND),
    (LayerExists, EXIT_EXISTS),
    (LayerBusy, EXIT_BUSY),
    (LayerHasChildren, EXIT_BUSY),
    (NotMounted, EXIT_BUSY),
    (BreakoutError, EXIT_ARCHIVE),
    (InvalidArchive, EXIT_ARCHIVE),
    (NotSupported, EXIT_NOT_SUPPORTED),
    (InvalidLayerId, EXIT_INVALID),
    (InvalidOption, EXIT_INVALID),
    (DriverError, EXIT_ERROR),
)


class UsageError(Exception):
    """Arguments that parse but make no sense together; exits with :data:`EXIT_USAGE`."""


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception a verb raised."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_ERROR


def error_line(message: object) -> None:
    """Print the one-line error every failing verb ends with."""
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- drivers and homes


def driver_label(spec: str) -> str:
    """A file-name-safe name for a driver spec (``pkg.mod:Cls`` -> ``pkg.mod_Cls``)."""
    return spec.replace(":", "_").replace("/", "_")


def data_root() -> Path:
    """``$XDG_DATA_HOME/graphdrivers`` or ``~/.local/share/graphdrivers``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / PROG


def default_home(spec: str) -> Path:
    return data_root() / driver_label(spec)


def home_of(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home(args.driver)


def parse_pairs(pairs: Sequence[str] | None, what: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` is an InvalidOption."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidOption(f"{what} {pair!r} is not of the form key=value")
        out[key] = value
    return out


def driver_options(args: argparse.Namespace) -> dict[str, str]:
    return parse_pairs(args.option, "driver option")


@contextlib.contextmanager
def driver_from_args(args: argparse.Namespace, *, keep_mounts: bool = False) -> Iterator[Driver]:
    """Open the driver the global options name; clean it up afterwards.

    ``keep_mounts`` skips :func:`finish` after success, which would undo the mount that
    ``graphdrivers mount`` is meant to leave in place.
    """
    home = home_of(args)
    log.debug("opening driver %s at %s", args.driver, home)
    driver = open_driver(args.driver, home, driver_options(args))
    try:
        yield driver
    except BaseException:
        finish(driver)  # a failed mount leaves nothing of its own behind either
        raise
    if not keep_mounts:
        finish(driver)


def finish(driver: Driver) -> None:
    """Release this process's mounts; shut the driver down unless CLI mounts must live on.

    A driver's cleanup unmounts everything under its home (also what other processes
    mounted, which is how it recovers from crashes), so it runs only when no
    ``graphdrivers mount`` record is left and no other live process has a layer mounted.
    """
    layers = driver.list_layers()
    for layer_id in layers:
        while driver.is_mounted(layer_id):
            driver.put(layer_id)
    if cli_mounts(driver):
        return
    held = [lid for lid in layers if driver._mounted_elsewhere(lid)]
    if held:  # another live process (API user) has them mounted: leave its mounts alone
        log.debug("not cleaning up: %s mounted by another process", ", ".join(held))
        return
    driver.cleanup()


# --------------------------------------------------------------------------- CLI mount records


def _records_path(driver: Driver) -> Path:
    return driver.home / CLI_MOUNTS_FILE


def _read_cli_mounts(driver: Driver) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_records_path(driver).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise DriverError(
            f"{_records_path(driver)} is corrupt ({exc}); unmount by hand and delete it",
            path=_records_path(driver),
        ) from exc
    return dict(data)


def _stale_reason(driver: Driver, layer_id: str, record: Mapping[str, Any]) -> str | None:
    """Why a CLI mount record no longer describes a live mount, or None if it still does."""
    try:
        lid = validate_layer_id(layer_id, driver.reserved_ids)
    except InvalidLayerId:
        return "its layer id is not valid"
    layer = driver.store.get(lid)
    if layer is None or layer.state is not LayerState.READY:
        return "the layer no longer exists"
    if "created" in record and record["created"] != layer.created:
        return "the layer was removed and made again"
    if driver._mount_present(lid) is False:
        return "its mount is gone"
    return None


def cli_mounts(driver: Driver) -> dict[str, dict[str, Any]]:
    """Layer id -> {"path", "readonly", "created"} of the live mounts ``graphdrivers mount`` left.

    Records are never trusted blindly: a layer removed or remade behind the CLI's back, or a
    mount undone by hand or by a crash cleanup, would otherwise make ``mount`` print a path
    that is not mounted and ``umount``/``rm`` fail. Such records are dropped (info log) and
    the file rewritten, under the store lock.
    """
    with driver.store.lock():
        records = _read_cli_mounts(driver)
        live = {}
        for layer_id, record in records.items():
            reason = _stale_reason(driver, layer_id, record)
            if reason is None:
                live[layer_id] = record
            else:
                log.info("dropping the stale CLI mount record of %s: %s", layer_id, reason)
        if live != records:
            _write_cli_mounts(driver, live)
        return live


def _write_cli_mounts(driver: Driver, records: Mapping[str, dict[str, Any]]) -> None:
    path = _records_path(driver)
    if records:
        atomic_write(path, json.dumps(dict(records), sort_keys=True, indent=1).encode())
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _mode(readonly: bool) -> str:
    return "read-only" if readonly else "read-write"


def mount_for_cli(driver: Driver, layer_id: str, readonly: bool) -> Path:
    """Mount a layer for ``graphdrivers mount`` and record it, or return the live record's path.

    Everything happens under the store lock (re-entrant in this process; the daemons a mount
    starts do not inherit it), so a second ``mount`` waits and then finds the first one's
    record instead of mounting the layer again. A record of the other mode is a conflict.
    """
    lid = validate_layer_id(layer_id, driver.reserved_ids)
    with driver.store.lock():
        known = cli_mounts(driver).get(lid)
        if known is not None:
            if bool(known["readonly"]) != readonly:
                raise LayerBusy(
                    f"layer {lid!r} is already mounted {_mode(bool(known['readonly']))}; "
                    f"run 'graphdrivers umount {lid}' first to mount it {_mode(readonly)}",
                    layer_id=lid,
                    expected=_mode(bool(known["readonly"])),
                    got=_mode(readonly),
                )
            return Path(known["path"])

        path = driver.get(lid, readonly=readonly)
        records = _read_cli_mounts(driver)
        records[lid] = {
            "path": str(path),
            "readonly": readonly,
            "created": driver.store.require(lid).created,
        }
        _write_cli_mounts(driver, records)
        return path


def release_cli_mount(driver: Driver, layer_id: str) -> None:
    """Undo a mount an earlier ``graphdrivers mount`` left.

    LayerNotFound if the layer does not exist, NotMounted if it has no live record.
    """
    lid: LayerId = validate_layer_id(layer_id, driver.reserved_ids)
    with driver.store.lock():
        records = cli_mounts(driver)
        if lid not in records:
            if not driver.exists(lid):
                raise LayerNotFound(lid)
            raise NotMounted(lid, f"layer {lid!r} is not mounted; nothing to umount")
        # The reference count of the process that mounted is gone with it: ask the driver's
        # unmount hook directly, which works from the layer's on-disk state.
        driver._unmount(lid)
        del records[lid]
        _write_cli_mounts(driver, records)


def refuse_if_cli_mounted(driver: Driver, layer_id: str) -> None:
    """LayerBusy if ``graphdrivers mount`` left the layer mounted (for rm and apply).

    Call it with the store lock held across the change it guards, so no mount slips in.
    """
    if layer_id in cli_mounts(driver):
        raise LayerBusy(
            f"layer {layer_id!r} is mounted by 'graphdrivers mount'; "
            f"run 'graphdrivers umount {layer_id}' first",
            layer_id=layer_id,
        )


# --------------------------------------------------------------------------- output


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class Progress:
    """A ``\\r``-redrawn bar on stderr, shown only when stdout is a terminal."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None):
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = stdout_is_terminal() if enabled is None else enabled
        self._last = 0.0

    def advance(self, amount: int = 1, *, note: str = "") -> None:
        self.done += amount
        self.draw(note)

    def set(self, done: int, total: int | None = None, note: str = "") -> None:
        self.done = done
        if total is not None:
            self.total = total
        self.draw(note)

    def draw(self, note: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * self.WIDTH)
            text = f"{self.label} [{bar:<{self.WIDTH}}] {frac * 100:5.1f}% {note}"
        else:
            text = f"{self.label} {self.done} {note}"
        sys.stderr.write("\r" + text[:100].ljust(100))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


class ProgressReader:
    """A binary stream wrapper that advances a :class:`Progress` by the bytes read."""

    def __init__(self, stream: BinaryIO, progress: Progress) -> None:
        self._stream = stream
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._progress.advance(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n = self._stream.readinto(buf)  # type: ignore[attr-defined]
        self._progress.advance(n or 0)
        return n or 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
