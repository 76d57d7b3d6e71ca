"""devicemapper driver specifics: the pool under it, O(1) snapshots, sizes, crashes, hangs.

The conformance suite checks the Driver contract on devicemapper; these tests look under it:
the pool's metadata must pass ``thin_check`` and our own reference recount after every
scenario, and the pool must hold exactly the devices the driver has records for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdrivers.drivers.devmapper.driver import DevmapperDriver, conformance_verify
from graphdrivers.errors import InvalidOption, NotSupported
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.thinpool import ThinPool
from graphdrivers.thinpool.check import check_pool

OPTIONS = {
    "dm.backend": "userspace",
    "dm.basesize": "256M",
    "dm.loopdatasize": "2G",
    "dm.loopmetadatasize": "32M",
}


def open_driver(home: Path, **extra: str) -> DevmapperDriver:
    try:
        return DevmapperDriver(home, {**OPTIONS, **extra})
    except NotSupported as exc:
        pytest.skip(f"devicemapper needs {exc.missing}")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    orphans_before = orphaned_loops()
    yield tmp_path / "home"
    leftovers = mounts_under(tmp_path)
    for mount in leftovers:
        subprocess.run(["umount", "-l", str(mount.target)], capture_output=True)
    assert not leftovers, f"left mounted: {[str(m.target) for m in leftovers]}"
    assert not loops_under(tmp_path)
    assert orphaned_loops() <= orphans_before, "a loop device outlived its pool daemon's mount"


def loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def orphaned_loops() -> set[str]:
    """Loop devices over a thin device file whose FUSE mount was detached lazily under them.

    Their backing file then reads ``/thin-<id>`` (the path inside the gone mount), so the
    check above, by path, cannot see them.
    """
    found = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if re.fullmatch(r"/thin-\d+", backing.read_text().strip()):
            found.add(backing.parts[3])
    return found


def pool_files(home: Path) -> tuple[Path, Path]:
    return home / "devicemapper" / "metadata", home / "devicemapper" / "data"


def assert_pool_consistent(home: Path) -> None:
    """thin_check and our recount are clean, and pool devices == the driver's records."""
    meta, data = pool_files(home)
    run = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert check_pool(meta) == []

    recorded = {
        json.loads(p.read_text())["device_id"] for p in (home / "metadata").glob("*.device")
    }
    recorded.add(json.loads((home / "metadata" / "base").read_text())["device_id"])
    with ThinPool.open(meta, data) as pool:
        assert set(pool.devices()) == recorded


def test_layers_are_snapshots_sharing_their_parents_blocks(home: Path) -> None:
    driver = open_driver(home)
    try:
        driver.create("base")
        with driver.mounted("base") as root:
            assert sorted(os.listdir(root)) == []
            (root / "big").write_bytes(os.urandom(8 * 1024 * 1024))
        used = driver.status().extra["Data Blocks Used/Total"].split("/")[0]

        for n in range(5):
            driver.create(f"child{n}", parent="base" if n == 0 else f"child{n - 1}")
        # Five snapshots of an 8 MiB file cost no data blocks: they share the base's.
        assert driver.status().extra["Data Blocks Used/Total"].split("/")[0] == used
        with driver.mounted("child4") as root:
            assert (root / "big").stat().st_size == 8 * 1024 * 1024
            (root / "big").write_bytes(b"changed")
        with driver.mounted("base") as root:
            assert (root / "big").stat().st_size == 8 * 1024 * 1024
    finally:
        driver.cleanup()
    assert_pool_consistent(home)


def test_size_option_grows_the_layer_filesystem(home: Path) -> None:
    driver = open_driver(home)
    try:
        driver.create("small")
        driver.create("big", parent="small", storage_opt={"size": "512M"})
        with driver.mounted("small") as root:
            small = shutil.disk_usage(root).total
        with driver.mounted("big") as root:
            big = shutil.disk_usage(root).total
        assert big > 1.8 * small
        with pytest.raises(InvalidOption, match="only grow"):
            driver.create("shrunk", parent="big", storage_opt={"size": "128M"})
        assert not driver.exists("shrunk")
    finally:
        driver.cleanup()
    assert_pool_consistent(home)


def test_remove_frees_the_blocks_of_a_layer(home: Path) -> None:
    driver = open_driver(home)
    try:
        driver.create("base")
        before = int(driver.status().extra["Data Blocks Used/Total"].split("/")[0])
        driver.create("scratch", parent="base")
        with driver.mounted("scratch") as root:
            (root / "data").write_bytes(os.urandom(4 * 1024 * 1024))
        assert int(driver.status().extra["Data Blocks Used/Total"].split("/")[0]) > before
        driver.remove("scratch")
        assert int(driver.status().extra["Data Blocks Used/Total"].split("/")[0]) == before
    finally:
        driver.cleanup()
    assert_pool_consistent(home)


def test_a_home_keeps_the_pool_settings_it_was_made_with(home: Path) -> None:
    """Regression: options given to an existing home were silently ignored, and ``status``
    reported the options instead of the pool."""
    open_driver(home, **{"dm.basesize": "64M"}).cleanup()

    # Opened with no size options: the home's own sizes, read from its records and pool.
    driver = DevmapperDriver(home, {"dm.backend": "userspace"})
    try:
        status = driver.status().extra
        assert status["Base Device Size"] == str(64 * 1024**2)
        assert status["Data Space Total"] == str(2 * 1024**3)
        assert status["Metadata Space Total"] == str(32 * 1024**2)
        driver.create("c")
        assert driver.metadata("c")["DeviceSize"] == str(64 * 1024**2)
        with driver.mounted("c") as root:
            assert shutil.disk_usage(root).total < 64 * 1024**2
    finally:
        driver.cleanup()

    refused = {
        "dm.loopdatasize": ("50G", "dm.loopdatasize=50G (the home has 2G)"),
        "dm.loopmetadatasize": ("1G", "dm.loopmetadatasize=1G (the home has 32M)"),
        "dm.blocksize": ("128K", "dm.blocksize=128K (the home has 64K)"),
        "dm.basesize": ("32M", "smaller than the home's base device (64M); it can only grow"),
        "dm.mkfsarg": ("-O ^has_journal", "dm.mkfsarg='-O ^has_journal' (the home has '')"),
    }
    for option, (value, says) in refused.items():
        with pytest.raises(InvalidOption) as caught:
            DevmapperDriver(home, {**OPTIONS, "dm.basesize": "64M", option: value})
        assert says in str(caught.value)
        assert "was made with dm.basesize=64M dm.loopdatasize=2G" in str(caught.value)
        assert "new home directory" in str(caught.value)
    assert not (home / "devicemapper" / "daemon.pid").exists()
    assert_pool_consistent(home)


def test_a_bigger_basesize_grows_the_base_device_for_new_layers(home: Path) -> None:
    driver = open_driver(home, **{"dm.basesize": "64M"})
    try:
        driver.create("old")
    finally:
        driver.cleanup()

    driver = open_driver(home, **{"dm.basesize": "192M"})
    try:
        assert driver.status().extra["Base Device Size"] == str(192 * 1024**2)
        driver.create("new")
        driver.create("new-child", parent="new")
        sizes = {layer: int(driver.metadata(layer)["DeviceSize"]) for layer in ("old", "new")}
        assert sizes == {"old": 64 * 1024**2, "new": 192 * 1024**2}
        with driver.mounted("old") as root:
            old_total = shutil.disk_usage(root).total
        with driver.mounted("new-child") as root:
            assert shutil.disk_usage(root).total > 2.5 * old_total
            (root / "f").write_bytes(os.urandom(100 * 1024 * 1024))  # more than 64M fits
    finally:
        driver.cleanup()

    driver = open_driver(home, **{"dm.basesize": "192M"})  # the same size again: no change
    try:
        assert driver.status().extra["Base Device Size"] == str(192 * 1024**2)
    finally:
        driver.cleanup()
    assert_pool_consistent(home)


@pytest.mark.expect_warnings
def test_a_data_file_bigger_than_the_free_space_is_warned_of_once(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96M", "tmpfs", str(small)], check=True)
    try:
        options = {**OPTIONS, "dm.basesize": "32M", "dm.loopmetadatasize": "8M"}
        caplog.set_level("WARNING", logger="graphdrivers")
        DevmapperDriver(small / "home", options).cleanup()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert "sparse 2G" in warnings[0] and "dm.loopdatasize" in warnings[0], warnings

        caplog.clear()
        DevmapperDriver(small / "home", options).cleanup()  # an existing pool: no warning
        assert [r for r in caplog.records if r.levelname == "WARNING"] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


CREATOR = textwrap.dedent(
    """
    import sys
    from graphdrivers.drivers.devmapper.driver import DevmapperDriver, conformance_verify
    home, options = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    driver = DevmapperDriver(home, options)
    parent = None
    for n in range(1000):
        driver.create(f"l{n}", parent=parent)
        print(n, flush=True)
        parent = f"l{n}"
    """
)


def test_kill_during_creates_leaves_layers_whole_or_absent(home: Path) -> None:
    open_driver(home).cleanup()
    args = [f"{k}={v}" for k, v in OPTIONS.items()]
    for stop_after in (2, 5):
        worker = subprocess.Popen(
            [sys.executable, "-c", CREATOR, str(home), *args], stdout=subprocess.PIPE, text=True
        )
        assert worker.stdout is not None
        for line in worker.stdout:
            if int(line) >= stop_after:
                break
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()

        driver = open_driver(home)
        try:
            layers = driver.list_layers()
            assert layers, "the layers created before the kill must survive"
            for layer in layers:
                with driver.mounted(layer) as root:
                    assert root.is_dir()
            for layer in layers:
                driver.remove(layer)
        finally:
            driver.cleanup()
        assert_pool_consistent(home)


@pytest.mark.expect_warnings
def test_cleanup_aborts_a_hung_pool_daemon(home: Path) -> None:
    """A daemon that stops answering must not leave writers stuck for ever."""
    driver = open_driver(home)
    driver.create("layer")
    root = driver.get("layer")
    pid = int((home / "devicemapper" / "daemon.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import os
            buf = bytearray(os.urandom(1 << 20))
            try:
                fd = os.open({str(root / "f")!r}, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
                for _ in range(64):
                    os.write(fd, memoryview(buf))
                os.fsync(fd)
            except OSError as exc:
                print("error", exc.errno, flush=True)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=3)  # the writer is stuck behind the stopped daemon
        driver.abort_hung_pool()
        out, _ = writer.communicate(timeout=60)
        assert out.startswith("error"), out
    finally:
        with _suppress():
            os.kill(pid, signal.SIGKILL)
        if writer.poll() is None:
            writer.kill()
        subprocess.run(["umount", "-l", str(home / "mnt" / "layer")], capture_output=True)
        for line in loops_under(home):
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
    # abort_hung_pool waited for (and reaped) the daemon it started.
    assert not Path(f"/proc/{pid}").exists()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def test_kernel_backend_runs_where_the_kernel_has_dm_thin(home: Path) -> None:
    """The kernel backend on this host: a real scenario, or a skip naming device-mapper.

    This is the one devicemapper test allowed to skip: the machines this project is tested on
    have no device-mapper, and the skip says so in its reason.
    """
    try:
        driver = DevmapperDriver(home, {**OPTIONS, "dm.backend": "kernel"})
    except NotSupported as exc:
        assert "device-mapper" in exc.missing or "thin-pool" in exc.missing, exc.missing
        pytest.skip(f"devicemapper kernel backend needs {exc.missing}")
    try:
        driver.create("base")
        driver.create("child", parent="base")
        with driver.mounted("child") as root:
            (root / "f").write_text("kernel")
        with driver.mounted("base") as root:
            assert not (root / "f").exists()
    finally:
        driver.cleanup()


def test_conformance_skips_the_kernel_backend_naming_device_mapper(tmp_path: Path) -> None:
    """What a user sees when running the suite on the kernel backend here: skips with why."""
    if Path("/dev/mapper/control").exists():
        pytest.skip("this host has device-mapper: the kernel backend runs instead of skipping")
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "graphdrivers"),
            "conformance",
            "devicemapper",
            "--home",
            str(tmp_path / "homes"),
            "--option",
            "dm.backend=kernel",
            "--",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "basetemp"),
            "-k",
            "test_create_base or test_remove_missing",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips, run.stdout
    for line in skips:
        assert "kernel device-mapper (/dev/mapper/control)" in line, line
    assert re.search(r"\b2 skipped\b", run.stdout), run.stdout


def test_conformance_verify_catches_a_broken_pool(home: Path) -> None:
    """The hook the suite runs after each check: clean pool passes, a damaged one does not."""
    driver = open_driver(home)
    try:
        driver.create("base")
        with driver.mounted("base") as root:
            (root / "f").write_bytes(os.urandom(256 * 1024))
    finally:
        driver.cleanup()
    assert conformance_verify(home) == []

    # A device the driver has no record of: made behind its back.
    meta, data = pool_files(home)
    with ThinPool.open(meta, data) as pool:
        pool.create_thin(999)
    assert conformance_verify(home) == ["pool devices without a driver record: [999]"]
    with ThinPool.open(meta, data) as pool:
        pool.delete(999)

    # A flipped byte in the superblock: both thin_check and our recount object.
    raw = bytearray(meta.read_bytes())
    raw[100] ^= 0xFF
    meta.write_bytes(raw)
    problems = conformance_verify(home)
    assert any(p.startswith("thin_check:") for p in problems), problems
    assert any("checksum" in p and not p.startswith("thin_check") for p in problems), problems


def test_benchmark_quick_run(tmp_path: Path) -> None:
    """benchmarks/bench_devmapper.py --quick prints its ratios and leaves nothing behind."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_devmapper.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^create_snap: .* ratio \d+\.\d\dx \(target <= 1\.2x\)$", run.stdout, re.M)
    for what in ("write", "read"):
        assert re.search(rf"^ext4 {what} 16 MiB: .* ratio \d+\.\d\dx", run.stdout, re.M), (
            run.stdout
        )
    assert list(tmp_path.iterdir()) == []
    assert mounts_under(tmp_path) == []


WRITER = textwrap.dedent(
    """
    import os, sys
    root = sys.argv[1]
    for n in range(100_000):
        try:
            fd = os.open(f"{root}/f{n}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, bytes([n % 251]) * 200_000)
            os.fsync(fd)
            os.close(fd)
        except OSError as exc:
            print("error", exc.errno, flush=True)
            break
        print(n, flush=True)
    """
)


@pytest.mark.expect_warnings
def test_kill_of_the_pool_daemon_during_writes(home: Path) -> None:
    """kill -9 of the daemon under a writing ext4: what was fsynced survives, the pool is clean.

    The kernel sees I/O errors once the daemon is gone; cleanup must still take down the ext4
    mount, the loop devices over the dead FUSE file and the FUSE mount, and the next driver
    finds the pool at its last commit, which holds every file the writer saw fsync succeed.
    """
    driver = open_driver(home)
    driver.create("base")
    with driver.mounted("base") as root:
        (root / "kept").write_bytes(b"base" * 1000)
    driver.create("layer", parent="base")
    root = driver.get("layer")
    pid = int((home / "devicemapper" / "daemon.pid").read_text())
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    synced = -1
    try:
        for line in writer.stdout:
            synced = int(line)
            if synced == 5:
                os.kill(pid, signal.SIGKILL)
                break
        for line in writer.stdout:  # writes in flight when the daemon died end in errors
            if line.startswith("error"):
                break
            synced = int(line)
    finally:
        writer.kill()
        writer.wait()
        driver.cleanup()
    assert not loops_under(home)
    assert not mounts_under(home)
    assert_pool_consistent(home)

    again = open_driver(home)
    try:
        assert sorted(again.list_layers()) == ["base", "layer"]
        with again.mounted("layer") as root:
            for n in range(synced + 1):
                assert (root / f"f{n}").read_bytes() == bytes([n % 251]) * 200_000, n
            assert (root / "kept").read_bytes() == b"base" * 1000
        with again.mounted("base") as root:
            assert sorted(os.listdir(root)) == ["kept"]
    finally:
        again.cleanup()
    assert_pool_consistent(home)
