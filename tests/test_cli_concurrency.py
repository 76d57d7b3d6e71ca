"""The command line against other processes: concurrent mounts, live API mounts, stale records.

Every check runs real ``graphdrivers`` processes against real mounts (FUSE, kernel overlayfs,
devicemapper's loop devices) in a temporary home, and scrubs every mount, loop device and
daemon it made, also when it fails. Nothing waits on a timer: concurrent commands are lined
up behind the store lock the test holds, and released once ``/proc/locks`` shows both waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Cli, make_tar

from graphdrivers.fsutil.fstype import mounts_under

REAL_MOUNT_DRIVERS = ("union", "overlay", "devicemapper")
WAIT_LIMIT = 60.0


def _loops_of(home: Path) -> list[str]:
    """The loop devices whose backing file is under ``home``."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if str(home) in line]


def _scrub(cli: Cli, driver: str) -> None:
    """Undo whatever a failed check left: records, mounts, loop devices, daemons."""
    (cli.home / "cli-mounts.json").unlink(missing_ok=True)
    if cli.home.is_dir():
        cli("--driver", driver, "ls")  # no records left: its cleanup stops the daemons
    for entry in mounts_under(cli.home):
        subprocess.run(["umount", "-l", str(entry.target)], check=False, capture_output=True)
    for loop in _loops_of(cli.home):
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture
def real(cli: Cli, request: pytest.FixtureRequest) -> Iterator[tuple[Cli, str]]:
    """A Cli and the name of a driver whose get makes a real mount; scrubbed afterwards."""
    driver: str = request.param
    try:
        yield cli, driver
    finally:
        _scrub(cli, driver)
    assert mounts_under(cli.home) == []
    assert _loops_of(cli.home) == []


def _lock_waiters(lock_file: Path) -> int:
    """How many processes wait for the flock on ``lock_file`` (the ``->`` lines of /proc/locks)."""
    inode = os.stat(lock_file).st_ino
    count = 0
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields and fields[-3].endswith(f":{inode}"):
                count += 1
    return count


def _wait_for(what: str, check: object) -> None:
    """Poll an observable state until it holds (no fixed sleep decides the outcome)."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("real", REAL_MOUNT_DRIVERS, indirect=True)
def test_two_mounts_at_once_mount_the_layer_once(real: tuple[Cli, str]) -> None:
    """Regression (bug: two ``mount`` at once gave two mounts, on dm two loop devices)."""
    cli, driver = real
    drv = ("--driver", driver)
    cli.ok(*drv, "create", "base", "--rw")

    lock_file = cli.home / "lock"
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # both commands queue behind this
        cmd = [sys.executable, "-m", "graphdrivers", "--home", str(cli.home), *drv]
        procs = [
            subprocess.Popen(
                [*cmd, "mount", "base"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        _wait_for("both mounts to wait for the store lock", lambda: _lock_waiters(lock_file) == 2)
    finally:
        os.close(fd)
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()
    paths = {out.decode().strip() for out, _ in outs}
    assert len(paths) == 1
    root = Path(paths.pop())

    layer_mounts = [m for m in mounts_under(cli.home) if "devicemapper" not in m.target.parts]
    assert len(layer_mounts) == 1, layer_mounts
    if driver == "devicemapper":
        assert len(_loops_of(cli.home)) == 1
    (root / "f").write_text("once\n")

    cli.ok(*drv, "umount", "base")
    cli.ok(*drv, "rm", "base")  # no records left: its cleanup stops the pool daemon
    assert mounts_under(cli.home) == []


@pytest.mark.parametrize("real", ["devicemapper"], indirect=True)
def test_apply_refuses_a_mounted_layer_and_keeps_it(real: tuple[Cli, str], tmp_path: Path) -> None:
    """Regression (bug: apply on a ``mount``-ed layer ran, and its failure deleted the layer)."""
    cli, driver = real
    drv = ("--driver", driver)
    tar = tmp_path / "base.tar"
    tar.write_bytes(make_tar({"f": b"base\n"}))
    cli.ok(*drv, "apply", "base", str(tar))
    root = Path(cli.ok(*drv, "mount", "base").strip())

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    for source in (tar, garbage):
        msg = cli.fails(5, *drv, "apply", "base", str(source))
        assert "umount base" in msg
    assert (root / "f").read_text() == "base\n"
    assert cli.ok(*drv, "ls").split() == ["base", "-", "mounted"]

    cli.ok(*drv, "umount", "base")
    cli.ok(*drv, "rm", "base")


@pytest.mark.parametrize("real", ["devicemapper"], indirect=True)
def test_a_record_whose_mount_is_gone_is_dropped(real: tuple[Cli, str]) -> None:
    """A mount undone behind the CLI's back: umount says not mounted, mount mounts afresh."""
    cli, driver = real
    drv = ("--driver", driver)
    cli.ok(*drv, "create", "x", "--rw")
    root = Path(cli.ok(*drv, "mount", "x").strip())
    subprocess.run(["umount", str(root.parent)], check=True)
    for loop in _loops_of(cli.home):
        subprocess.run(["losetup", "-d", loop], check=True)

    msg = cli.fails(5, *drv, "umount", "x")
    assert "layer 'x' is not mounted" in msg
    again = Path(cli.ok(*drv, "mount", "x").strip())
    assert again.is_dir()
    assert [m.target for m in mounts_under(again.parent)] == [again.parent]
    cli.ok(*drv, "umount", "x")
    cli.ok(*drv, "rm", "x")


def test_a_record_whose_layer_is_gone_is_dropped(cli: Cli) -> None:
    """A record naming a layer that no longer exists is dropped, never trusted."""
    cli.ok("create", "x")
    cli.ok("mount", "x")
    records = json.loads((cli.home / "cli-mounts.json").read_text())
    records["ghost"] = {"path": str(cli.home / "nowhere"), "readonly": False}
    (cli.home / "cli-mounts.json").write_text(json.dumps(records))

    cli.fails(3, "umount", "ghost")
    assert json.loads(cli.ok("status", "--json"))["cli_mounts"] == ["x"]
    cli.ok("umount", "x")
    assert not (cli.home / "cli-mounts.json").exists()


HOLDER = """
import sys
from graphdrivers.registry import open_driver
with open_driver(sys.argv[1], sys.argv[2]) as driver, driver.mounted("held") as root:
    print(root, flush=True)
    sys.stdin.readline()
    print((root / "f").read_text(), end="", flush=True)
"""


@pytest.mark.parametrize("real", REAL_MOUNT_DRIVERS, indirect=True)
def test_rm_and_apply_refuse_a_layer_another_process_holds(
    real: tuple[Cli, str], tmp_path: Path
) -> None:
    """Regression (bug: ``rm`` removed a layer a live API process had mounted)."""
    cli, driver = real
    drv = ("--driver", driver)
    tar = tmp_path / "held.tar"
    tar.write_bytes(make_tar({"f": b"held\n"}))
    cli.ok(*drv, "apply", "held", str(tar))

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, driver, str(cli.home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        root = Path(holder.stdout.readline().decode().strip())
        assert root.is_dir(), holder.stderr.read().decode() if holder.stderr else ""

        assert "mounted by another process" in cli.fails(5, *drv, "rm", "held")
        assert "mounted by another process" in cli.fails(5, *drv, "apply", "held", str(tar))
        cli.fails(5, *drv, "changes", "held", "--full")  # no second mount of it either
        assert (root / "f").read_text() == "held\n"

        out, err = holder.communicate(b"\n", timeout=120)
        assert holder.returncode == 0, err.decode()
        assert out.decode() == "held\n"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    cli.ok(*drv, "rm", "held")


def test_umount_of_a_layer_not_mounted_or_missing(cli: Cli) -> None:
    """umount: NotMounted (5) says the layer is not mounted; a missing layer is 3."""
    cli.ok("create", "x")
    msg = cli.fails(5, "umount", "x")
    assert "layer 'x' is not mounted" in msg and "put(" not in msg
    assert "does not exist" in cli.fails(3, "umount", "nope")


@pytest.mark.parametrize("real", ["vfs", "union"], indirect=True)
def test_mount_in_the_other_mode_is_refused(real: tuple[Cli, str]) -> None:
    """Regression (bug: ``mount b`` after ``mount b --readonly`` returned the ro mount)."""
    cli, driver = real
    drv = ("--driver", driver)
    cli.ok(*drv, "create", "b", "--rw")
    path = cli.ok(*drv, "mount", "b", "--readonly")
    msg = cli.fails(5, *drv, "mount", "b")
    assert "already mounted read-only" in msg and "umount b" in msg
    assert cli.ok(*drv, "mount", "b", "--readonly") == path  # the same mode is fine
    cli.ok(*drv, "umount", "b")
    cli.ok(*drv, "mount", "b")
    assert "already mounted read-write" in cli.fails(5, *drv, "mount", "b", "--readonly")
    cli.ok(*drv, "umount", "b")
    cli.ok(*drv, "rm", "b")
