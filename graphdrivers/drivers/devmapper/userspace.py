"""The userspace pool backend: a :mod:`graphdrivers.thinpool` pool served by fusemount.

The kernel of many machines has no device-mapper. This backend keeps the pool in two files in
dm-thin's own format and runs one ``fusemount.thindev`` daemon per pool while any of its thin
devices is active. The daemon shows each active device as a file; a loop device over that file
is the block device the kernel mounts ext4 on::

    ext4 (kernel) ─► /dev/loopN ─► POOLDIR/mnt/thin-<id> (FUSE) ─► fusemount.thindev ─► pool
                                                                     metadata + data files

The daemon starts with the first activation and serves until :meth:`UserspaceBackend.shutdown`
(the driver's ``cleanup``), not only while a device is active: starting one costs about 0.4 s
(mostly importing trio and pyfuse3), which a put followed by a get would pay each time. While
there is no daemon, messages are applied to the pool files directly by this process, under an
flock on ``POOLDIR/pool.lock``; while there is one, they go through its control file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from graphdrivers.drivers.devmapper.baseimage import copy_extents
from graphdrivers.errors import DriverError, MountError
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.thinpool import ThinPool
from graphdrivers.thinpool.errors import DeviceExists, DeviceNotFound, ThinPoolError
from graphdrivers.thinpool.messages import parse_message, send_message

log = logging.getLogger(__name__)

DAEMON_MOUNT_DIR = "mnt"
DAEMON_PID_FILE = "daemon.pid"
DAEMON_LOG_FILE = "daemon.log"
POOL_LOCK_FILE = "pool.lock"
CONTROL_FILE = "control"
DEVICE_PREFIX = "thin-"
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 30.0
FUSECTL_DIR = Path("/sys/fs/fuse/connections")
LOOP_READ_AHEAD_KB = 1024


class UserspaceBackend:
    """A pool in files, exposed to the kernel through FUSE and loop devices."""

    name = "userspace"

    def __init__(
        self,
        pool_dir: Path,
        metadata: Path,
        data: Path,
        *,
        data_size: int,
        metadata_size: int,
        block_sectors: int,
    ) -> None:
        self.pool_dir = pool_dir
        self.metadata = metadata
        self.data = data
        self.mountpoint = pool_dir / DAEMON_MOUNT_DIR
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        self._mount_target = pool_dir.resolve() / DAEMON_MOUNT_DIR  # resolved before mounting
        self._daemon: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd = -1

        for path, size in ((data, data_size), (metadata, metadata_size)):
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(size)  # sparse: blocks are allocated as the pool writes them
        with open(metadata, "rb") as f:
            formatted = any(f.read(4096))
        if not formatted:
            with self._locked():
                ThinPool.format(metadata, data, data_block_size=block_sectors).close()
            log.info("formatted thin pool %s (%d-sector blocks)", metadata, block_sectors)

    # ------------------------------------------------------------------ daemon

    def daemon_live(self) -> bool:
        """Is a daemon serving the pool? A dead one's mount is cleared on the way.

        Nothing here touches the FUSE mount itself while the daemon's pid answers: every stat
        of it is a round trip through the daemon, and this is asked before each message.
        """
        if not any(m.target == self._mount_target for m in mounts_under(self.pool_dir)):
            return False
        pid = self._daemon_pid()
        if pid is not None and _process_alive(pid) and _is_pool_daemon(pid):
            return True
        try:
            os.statvfs(self.mountpoint)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            log.info("thin pool daemon at %s is gone; clearing its mount", self.mountpoint)
            # Its loop devices first, while their backing paths still name the mount: once it
            # is detached they read "/thin-N" and nothing would find them again. A loop that
            # a filesystem still uses goes when that filesystem is unmounted (autoclear).
            for loop in _loops_backed_under(self.mountpoint):
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            return False
        return True

    def _daemon_pid(self) -> int | None:
        if self._daemon is not None:
            return self._daemon.pid
        try:
            return int((self.pool_dir / DAEMON_PID_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _start_daemon(self) -> None:
        read_fd, write_fd = os.pipe()
        log_path = self.pool_dir / DAEMON_LOG_FILE
        options = f"metadata={self.metadata},data={self.data},ready_fd={write_fd},log={log_path}"
        with self._locked():
            with open(log_path, "ab") as log_file:
                self._daemon = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fusemount.thindev",
                        "-o",
                        options,
                        str(self.mountpoint),
                    ],
                    pass_fds=(write_fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    start_new_session=True,
                )
            os.close(write_fd)
            try:
                ready, _, _ = select.select([read_fd], [], [], DAEMON_START_TIMEOUT)
                answer = os.read(read_fd, 16) if ready else b""
            finally:
                os.close(read_fd)
        if answer != b"ready\n":
            self._daemon.kill()
            self._daemon.wait()
            raise MountError(f"thin pool daemon did not start; see {log_path}")
        (self.pool_dir / DAEMON_PID_FILE).write_text(f"{self._daemon.pid}\n")
        log.debug("thin pool daemon %d serves %s", self._daemon.pid, self.mountpoint)

    def _stop_daemon(self) -> None:
        run = subprocess.run(
            ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True
        )
        if run.returncode != 0 and self.daemon_live():
            raise MountError(f"cannot unmount thin pool daemon: {run.stderr.strip()}")
        self._wait_daemon_exit()

    def _wait_daemon_exit(self) -> None:
        pid_file = self.pool_dir / DAEMON_PID_FILE
        if self._daemon is not None:
            try:
                self._daemon.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait()
            self._daemon = None
        elif pid_file.exists():
            pid = int(pid_file.read_text() or 0)
            deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
            while pid and _process_alive(pid) and time.monotonic() < deadline:
                select.select([], [], [], 0.05)  # a daemon of another process: poll its exit
            if pid and _process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    def abort_daemon(self) -> None:
        """Cut a hung daemon's FUSE connection so that writers stuck on it fail, then unmount."""
        # Never stat the mountpoint: a stat of a hung FUSE mount waits for the daemon too.
        minor = _fuse_minor_from_mountinfo(self.mountpoint)
        if not FUSECTL_DIR.joinpath(str(minor)).exists():
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", str(FUSECTL_DIR)], capture_output=True
            )
        abort = FUSECTL_DIR / str(minor) / "abort"
        abort.write_text("1")
        log.warning("aborted the FUSE connection of thin pool daemon at %s", self.mountpoint)

        # What sat on the dead connection goes too: filesystems on its loop devices, then the
        # loop devices (found through sysfs, which never touches the FUSE mount).
        for loop in _loops_backed_under(self.mountpoint):
            for target in _mounts_of_device(loop):
                subprocess.run(["umount", "-l", target], capture_output=True)
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        pid_file = self.pool_dir / DAEMON_PID_FILE
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        self._wait_daemon_exit()

    # ------------------------------------------------------------------ messages

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the pool: across processes (flock) and threads; re-entrant in one thread."""
        with self._lock:
            if self._lock_depth == 0:
                self._lock_fd = os.open(
                    self.pool_dir / POOL_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    os.close(self._lock_fd)
                    self._lock_fd = -1

    def message(self, text: str) -> None:
        """Send a pool message (create_thin, create_snap, delete, set_transaction_id)."""
        parse_message(text)  # refuse malformed text before touching anything
        with self._locked():
            if self.daemon_live():
                self._control(text)
                return
            with ThinPool.open(self.metadata, self.data) as pool:
                send_message(pool, text)

    def _control(self, text: str) -> None:
        try:
            with open(self.mountpoint / CONTROL_FILE, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise DeviceExists(f"{text}: device exists") from exc
            if exc.errno == errno.ENOENT:
                raise DeviceNotFound(f"{text}: no such device") from exc
            raise ThinPoolError(f"pool message {text!r} failed: {exc.strerror}") from exc

    def _status(self) -> dict[str, str]:
        with self._locked():
            return self._status_locked()

    def _status_locked(self) -> dict[str, str]:
        if self.daemon_live():
            text = (self.mountpoint / CONTROL_FILE).read_text()
            return dict(line.partition(" ")[::2] for line in text.splitlines())
        with ThinPool.open(self.metadata, self.data) as pool:
            s = pool.status()
            return {
                "transaction_id": str(s.transaction_id),
                "metadata": f"{s.used_metadata_blocks}/{s.total_metadata_blocks}",
                "data": f"{s.used_data_blocks}/{s.total_data_blocks}",
                "data_block_size": str(s.data_block_size),
                "devices": " ".join(str(d) for d in pool.devices()),
                "active": "",
            }

    def transaction_id(self) -> int:
        return int(self._status()["transaction_id"])

    def devices(self) -> set[int]:
        return {int(d) for d in self._status()["devices"].split()}

    def status(self) -> dict[str, str]:
        info = self._status()
        return {
            "Pool Backend": self.name,
            "Pool Metadata File": str(self.metadata),
            "Pool Data File": str(self.data),
            "Data Blocks Used/Total": info["data"],
            "Metadata Blocks Used/Total": info["metadata"],
            "Data Block Size (sectors)": info["data_block_size"],
            "Transaction Id": info["transaction_id"],
        }

    # ------------------------------------------------------------------ activation

    def activate(self, dev_id: int, size: int) -> Path:
        """Make a thin device a kernel block device (a loop device over its FUSE file)."""
        with self._locked():
            return self._activate(dev_id, size)

    def _activate(self, dev_id: int, size: int) -> Path:
        if not self.daemon_live():
            self._start_daemon()
        self._control(f"activate {dev_id} {size}")
        backing = self.mountpoint / f"{DEVICE_PREFIX}{dev_id}"
        run = subprocess.run(
            ["losetup", "-f", "--show", "--direct-io=on", str(backing)],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            run = subprocess.run(
                ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True
            )
        if run.returncode != 0:
            self._control(f"deactivate {dev_id}")
            raise MountError(f"losetup of thin device {dev_id} failed: {run.stderr.strip()}")
        loop = Path(run.stdout.strip())
        _set_read_ahead(loop, LOOP_READ_AHEAD_KB)
        return loop

    def write_image(self, dev_id: int, size: int, image: Path) -> None:
        """Copy the data extents of the file ``image`` into a thin device of ``size`` bytes."""
        with self._locked():
            if not self.daemon_live():  # the usual case: straight into the pool files
                with ThinPool.open(self.metadata, self.data) as pool:
                    copy_extents(image, pool.device(dev_id).pwrite)
                    pool.commit()
                return
            self._control(f"activate {dev_id} {size}")
            try:
                fd = os.open(self.mountpoint / f"{DEVICE_PREFIX}{dev_id}", os.O_WRONLY)
                try:
                    copy_extents(image, lambda data, offset: os.pwrite(fd, data, offset))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                self._control(f"deactivate {dev_id}")

    def deactivate(self, dev_id: int) -> None:
        """Detach the device's loop devices and deactivate it; the daemon stays (see shutdown)."""
        with self._locked():
            self._deactivate(dev_id)

    def _deactivate(self, dev_id: int) -> None:
        if not self.daemon_live():
            return
        backing = self.mountpoint / f"{DEVICE_PREFIX}{dev_id}"
        for loop in _loops_of(backing):
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
        _wait_loops_detached(backing)
        self._control(f"deactivate {dev_id}")

    def shutdown(self) -> None:
        """Detach every loop device over the pool's files and stop the daemon."""
        with self._locked():
            self._shutdown()

    def _shutdown(self) -> None:
        if self.daemon_live():
            for dev in self._status().get("active", "").split():
                self.deactivate(int(dev))
            if self.daemon_live():
                self._stop_daemon()
        else:
            self._wait_daemon_exit()


def _set_read_ahead(loop: Path, kib: int) -> None:
    """Let sequential reads reach the daemon as few big requests rather than many 128 KiB ones.

    Each request to the daemon costs a FUSE round trip and a Python call whatever its size.
    """
    knob = Path("/sys/block") / loop.name / "queue" / "read_ahead_kb"
    try:
        knob.write_text(str(kib))
    except OSError as exc:
        log.debug("cannot set %s: %s", knob, exc)


def _loops_of(path: Path) -> list[str]:
    """Loop devices attached to ``path``, from sysfs (cheaper than running losetup -j)."""
    wanted = str(path.absolute().parent.resolve() / path.name)
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip() == wanted:
                found.append("/dev/" + backing.parts[3])
    return found


def _loops_backed_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory``, read from sysfs only.

    A loop device keeps its backing file's path as it was when it was attached; after a lazy
    unmount of the directory that path no longer resolves, so compare the recorded strings.
    """
    prefix = str(directory.absolute().parent.resolve() / directory.name) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(prefix):
                found.append("/dev/" + backing.parts[3])
    return found


def _mounts_of_device(device: str) -> list[str]:
    """Mount points whose source is ``device``, from /proc/self/mountinfo (no stat)."""
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            source = fields[fields.index("-") + 2]
            if source == device:
                targets.append(fields[4].replace("\\040", " "))
    return targets


def _wait_loops_detached(path: Path) -> None:
    """losetup -d can return before the kernel lets go of the file: wait for it, bounded."""
    deadline = time.monotonic() + 10
    while _loops_of(path):
        if time.monotonic() > deadline:
            raise DriverError(f"loop devices over {path} do not detach")
        select.select([], [], [], 0.02)


def _is_pool_daemon(pid: int) -> bool:
    """Is ``pid`` a thindev daemon (and not a process that reused a dead daemon's pid)?"""
    try:
        return b"fusemount.thindev" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def _fuse_minor_from_mountinfo(mountpoint: Path) -> int:
    """The device minor of the FUSE mount at ``mountpoint``, read without touching the mount.

    Only the parent directory is resolved: resolving the mountpoint itself would stat it,
    which blocks for as long as the daemon behind it does not answer.
    """
    target = str(mountpoint.absolute().parent.resolve() / mountpoint.name)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return int(fields[2].split(":")[1])
    raise MountError(f"{mountpoint} is not mounted")
