"""The ``union`` driver: layers merged by fusemount, our FUSE union filesystem, one daemon a mount.

The on-disk layout is the overlay driver's (:mod:`graphdrivers.drivers.unionfs.layout`); what
differs is who merges the layers. Every mounted layer gets its own fusemount daemon (pyfuse3
holds one session per process), started with fuse-overlayfs's command line from the home
directory, so the layer paths stay short whatever the depth::

    cd HOME && fusemount -o lowerdir=l/<A>:l/<B>,upperdir=<id>/diff,workdir=<id>/work,
                            whiteout=overlay,pidfile=HOME/<id>/daemon.pid,noauto_unmount
                            HOME/<id>/merged

The command returns once the mount is live, and the daemon has written its PID to
``HOME/<id>/daemon.pid``, so that ``put`` (and a later process's ``cleanup``) can wait for it to
exit after ``fusermount3 -u`` (through a pidfd: no polling). A read-only mount
(``get(readonly=True)``, or a layer with children) has no upper: ``lowerdir=<id>/diff:l/<A>:...``.

A daemon that dies under a mount leaves a dead mount: it still shows in mountinfo, and
``statvfs`` fails with ENOTCONN. The next ``get`` of that layer notices, detaches it
(``fusermount3 -u -z``) and starts a new daemon, keeping the reference count. The driver turns
off fusermount3's ``auto_unmount`` so that its helper, waking late, cannot unmount the new
mount instead of the dead one.

Driver options:

``whiteout``
    ``overlay`` (character device 0/0 and the ``trusted.overlay.opaque`` xattr, as kernel
    overlayfs) or ``aufs`` (``.wh.<name>`` files and ``.wh..wh..opq``, which need no CAP_MKNOD).
    The default is ``overlay`` when this process has CAP_MKNOD, ``aufs`` otherwise. fusemount
    reads both formats whatever this says; it decides what deletions write. The format is
    recorded in ``HOME/.whiteout-format`` when the home is made: a later open without the
    option uses it, and one with the other format is refused (InvalidOption). A home made
    before the record existed takes the format of its next open.
``mount_program``
    The FUSE program to run: ``fusemount`` (default: the console script next to this Python,
    or ``python -m fusemount.main``) or a path to another one with the same command line, such
    as ``/usr/bin/fuse-overlayfs`` to compare against the reference implementation (overlay
    whiteouts only).

Needs ``/dev/fuse`` and ``fusermount3`` (the fuse3 package).

Limitations:

- Mounts are reference-counted per driver object; two processes mounting the same layer of
  one home at once share ``merged/`` and the second replaces the first one's daemon.
- A diff against the direct parent reads ``diff/`` directly, except while the layer is mounted
  writable: then it is the naive diff through the mount, since the daemon's writeback cache
  may hold data not yet written to ``diff/``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from graphdrivers.errors import InvalidOption, MountError, NotSupported
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.ids import LayerId, validate_layer_id
from graphdrivers.store import atomic_write
from graphdrivers.whiteout import WhiteoutFormat

from .unionfs.base import UnionDriverBase
from .unionfs.layout import DAEMON_PID_FILE, UnionLayout

log = logging.getLogger(__name__)

DEFAULT_MOUNT_PROGRAM = "fusemount"
FUSERMOUNT = "fusermount3"
FUSE_DEVICE = "/dev/fuse"
PROC_STATUS = "/proc/self/status"
CAP_MKNOD = 27
#: the deepest stack this driver makes (fusemount has no kernel limit; this bounds one mount's
#: open directory fds and its command line)
UNION_MAX_DEPTH = 2000
#: seconds to wait for a mount program to report its mount live, or a daemon to exit
MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0


def has_capability(bit: int) -> bool:
    """True if capability number ``bit`` is in this process's effective set."""
    try:
        with open(PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def default_mount_program() -> list[str]:
    """The command that runs fusemount with the Python running this driver."""
    script = Path(sys.executable).with_name(DEFAULT_MOUNT_PROGRAM)
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fusemount.main"]


class UnionDriver(UnionDriverBase):
    """The shared union layout merged by one fusemount daemon a mount (see module docstring)."""

    name: ClassVar[str] = "union"
    known_options: ClassVar[frozenset[str]] = frozenset({"whiteout", "mount_program"})
    max_depth: ClassVar[int] = UNION_MAX_DEPTH

    def __init__(self, home: Path | str, options: Mapping[str, str] | None = None) -> None:
        opts = dict(options or {})
        self._whiteout = choose_whiteout(UnionLayout(Path(home).absolute()), opts.get("whiteout"))

        program = opts.get("mount_program", DEFAULT_MOUNT_PROGRAM)
        if program == DEFAULT_MOUNT_PROGRAM:
            self.mount_command = default_mount_program()
            self._is_fusemount = True
        else:
            found = shutil.which(program)
            if found is None:
                raise InvalidOption(f"union: mount_program {program!r} not found")
            self.mount_command = [found]
            self._is_fusemount = False
            if self._whiteout is not WhiteoutFormat.OVERLAY:
                raise InvalidOption(
                    f"union: mount_program {program!r} writes overlay whiteouts only; "
                    "whiteout=aufs needs fusemount"
                )
        super().__init__(home, opts)

    @property
    def whiteout_format(self) -> WhiteoutFormat:
        return self._whiteout

    def _init_home(self) -> None:
        super()._init_home()
        # Under the store lock: of two processes making one home at once, the second sees the
        # first one's record here, even though it read none in __init__.
        recorded = self.layout.recorded_whiteout()
        if recorded is None:
            self.layout.record_whiteout(self._whiteout.value)
        elif recorded != self._whiteout.value:
            raise InvalidOption(_contradiction(self.layout.home, recorded, self._whiteout.value))

    def _check_host(self) -> None:
        if not os.path.exists(FUSE_DEVICE):
            raise NotSupported(f"device {FUSE_DEVICE}", hint="modprobe fuse", driver=self.name)
        if shutil.which(FUSERMOUNT) is None:
            raise NotSupported(
                f"tool {FUSERMOUNT}", hint="apt-get install fuse3", driver=self.name
            )
        if self._whiteout is WhiteoutFormat.OVERLAY and not has_capability(CAP_MKNOD):
            raise NotSupported(
                "privilege CAP_MKNOD for overlay whiteouts",
                hint="use whiteout=aufs",
                driver=self.name,
            )

    # ---------------------------------------------------------------- mounting

    def get(self, layer_id: str, *, readonly: bool = False) -> Path:
        """As :meth:`Driver.get`, but a mount whose daemon died is remounted first."""
        lid = validate_layer_id(layer_id, self.reserved_ids)
        with self._refs_lock:
            if self._refs.get(lid, 0) > 0 and not self._mount_alive(lid):
                log.info("layer %s: its fusemount daemon is gone; remounting", lid)
                record = self.store.require(lid)
                self._mount(record, lid in self._readonly_mounts)
            return super().get(layer_id, readonly=readonly)

    def _mount_alive(self, layer_id: LayerId) -> bool:
        """True if merged/ is a FUSE mount that answers."""
        merged = self.layout.merged_dir(layer_id)
        if not any(e.target == merged for e in mounts_under(merged)):
            return False
        try:
            os.statvfs(merged)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return False
            raise
        return True

    def _mount_stack(self, layer_id: LayerId, lowers: list[Path], readonly: bool) -> None:
        home = self.layout.home
        options = ["lowerdir=" + ":".join(os.fspath(p.relative_to(home)) for p in lowers)]
        if not readonly:
            options.append(f"upperdir={self.layout.diff_dir(layer_id).relative_to(home)}")
            options.append(f"workdir={self.layout.work_dir(layer_id).relative_to(home)}")
        if self._is_fusemount:
            options.append(f"whiteout={self._whiteout.value}")
            options.append(f"pidfile={self.layout.pid_file(layer_id)}")
            # The driver finds and replaces dead mounts itself; fusermount3's auto_unmount
            # helper could otherwise unmount the replacement it races with.
            options.append("noauto_unmount")

        merged = self.layout.merged_dir(layer_id)
        command = [*self.mount_command, "-o", ",".join(options), os.fspath(merged)]
        log.debug("layer %s: running %s", layer_id, command)
        try:
            proc = subprocess.run(
                command,
                cwd=home,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=MOUNT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MountError(
                f"running {command[0]} for {merged} failed: {exc}", path=merged
            ) from exc
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip()
            raise MountError(
                f"{command[0]} could not mount layer {layer_id!r} at {merged} "
                f"(exit status {proc.returncode}): {detail}",
                layer_id=layer_id,
                path=merged,
            )

        if not self._is_fusemount:  # another program: find its daemon and record it
            pid = find_daemon(merged)
            if pid is not None:
                atomic_write(self.layout.pid_file(layer_id), f"{pid}\n".encode(), 0o644)
        log.debug("layer %s: daemon %s serves %s", layer_id, self._daemon_pid(merged), merged)

    def _unmount_stack(self, layer_id: LayerId) -> None:
        merged = self.layout.merged_dir(layer_id)
        pid = self._daemon_pid(merged)
        proc = subprocess.run(
            [FUSERMOUNT, "-u", os.fspath(merged)], capture_output=True, check=False
        )
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip()
            log.debug("fusermount3 -u %s failed (%s); detaching it", merged, detail)
            self._detach_stale(merged)
        if pid is not None:
            wait_for_exit(pid, EXIT_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.pid_file(layer_id))

    def _detach_stale(self, mountpoint: Path) -> None:
        """Lazily unmount a FUSE mount (alive or dead) and wait for its daemon to go."""
        pid = self._daemon_pid(mountpoint)
        proc = subprocess.run(
            [FUSERMOUNT, "-u", "-z", os.fspath(mountpoint)], capture_output=True, check=False
        )
        if proc.returncode != 0 and any(e.target == mountpoint for e in mounts_under(mountpoint)):
            detail = proc.stderr.decode(errors="replace").strip()
            raise MountError(f"could not unmount {mountpoint}: {detail}", path=mountpoint)
        if pid is not None:
            wait_for_exit(pid, EXIT_TIMEOUT)

    def _daemon_pid(self, mountpoint: Path) -> int | None:
        """The daemon serving ``mountpoint``: its recorded PID if that still serves it."""
        try:
            pid = int((mountpoint.parent / DAEMON_PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return find_daemon(mountpoint)
        return pid if _serves(pid, mountpoint) else find_daemon(mountpoint)


def choose_whiteout(layout: UnionLayout, requested: str | None) -> WhiteoutFormat:
    """The whiteout format of a home: the one it was made with, else the asked or default one.

    An explicit option that contradicts the home's record is refused rather than obeyed: one
    home writing both formats would hold layers that each reader must guess the format of.
    """
    if requested is not None and requested not in {f.value for f in WhiteoutFormat}:
        raise InvalidOption(f"union: whiteout={requested!r}; use overlay or aufs")
    recorded = layout.recorded_whiteout()
    if recorded is not None and requested is not None and requested != recorded:
        raise InvalidOption(_contradiction(layout.home, recorded, requested))
    if recorded is not None:
        return WhiteoutFormat(recorded)
    if requested is not None:
        return WhiteoutFormat(requested)
    return WhiteoutFormat.OVERLAY if has_capability(CAP_MKNOD) else WhiteoutFormat.AUFS


def _contradiction(home: Path, recorded: str, requested: str) -> str:
    return (
        f"union: whiteout={requested} contradicts the home {home}, made with "
        f"whiteout={recorded} (its layers hold {recorded} whiteouts); open it with "
        f"whiteout={recorded} or without the option, or use a new home for {requested}"
    )


def find_daemon(mountpoint: Path) -> int | None:
    """The PID of the FUSE daemon serving ``mountpoint``, found through /proc, or None.

    A daemon is a process whose command line ends with the mountpoint and that holds
    ``/dev/fuse`` open. (fuse-overlayfs and fusemount both detach from the process that started
    them, so the PID of that process is not the daemon's.)
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _serves(int(entry), mountpoint):
            return int(entry)
    return None


def _serves(pid: int, mountpoint: Path) -> bool:
    """True if process ``pid`` has ``mountpoint`` as its last argument and /dev/fuse open."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().rstrip(b"\0").split(b"\0")
        if args[-1] != os.fsencode(mountpoint):
            return False
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == FUSE_DEVICE:
                    return True
    except OSError:
        pass
    return False


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (through a pidfd); False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        log.warning("fusemount daemon %d did not exit within %.0f s", pid, timeout)
    return bool(ready)
