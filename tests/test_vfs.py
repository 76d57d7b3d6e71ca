"""The vfs driver: layout, lifecycle, copies, crash safety, and the diff side through it.

The moby graphtest checks come first (create empty, createBase/verifyBase, snapshot, a deep
chain), then what is particular to vfs: the layout under the home, children independent of their
parents, staging left empty by a killed create and by a failed one. Trees are compared with the
independent manifest of tests/test_fsutil_copy.py. Runs as root.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_fsutil_copy import build_tree, manifest, mounted_fs

from graphdrivers.driver import Change, Kind
from graphdrivers.drivers.vfs import LAYERS_DIR, VfsDriver
from graphdrivers.errors import (
    DriverError,
    LayerBusy,
    LayerHasChildren,
    LayerNotFound,
    NotMounted,
    ParentNotFound,
)
from graphdrivers.fsutil.copy import CopyMethod
from graphdrivers.registry import open_driver
from graphdrivers.store import LayerRecord, LayerState

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, mknod)")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[VfsDriver]:
    with VfsDriver(tmp_path / "home") as d:
        yield d


def create_base(driver: VfsDriver, layer_id: str) -> None:
    """moby graphtest's createBase: a sticky 0705 dir owned 1:2 and a 0222|setuid file."""
    driver.create(layer_id)
    with driver.mounted(layer_id) as root:
        old = os.umask(0)
        try:
            os.mkdir(root / "a subdir", 0o705 | stat.S_ISVTX)
            os.lchown(root / "a subdir", 1, 2)
            fd = os.open(root / "a file", os.O_WRONLY | os.O_CREAT, 0o222 | stat.S_ISUID)
            os.write(fd, b"Some data")
            os.close(fd)
        finally:
            os.umask(old)


def verify_base(driver: VfsDriver, layer_id: str) -> None:
    """moby graphtest's verifyBase: both entries with their exact mode and owner, nothing else."""
    with driver.mounted(layer_id) as root:
        sub = os.lstat(root / "a subdir")
        assert stat.S_ISDIR(sub.st_mode)
        assert stat.S_IMODE(sub.st_mode) == 0o705 | stat.S_ISVTX
        assert (sub.st_uid, sub.st_gid) == (1, 2)

        file = os.lstat(root / "a file")
        assert stat.S_ISREG(file.st_mode)
        assert stat.S_IMODE(file.st_mode) == 0o222 | stat.S_ISUID
        assert (root / "a file").read_bytes() == b"Some data"
        assert sorted(os.listdir(root)) == ["a file", "a subdir"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------- moby graphtest


def test_create_empty(driver: VfsDriver) -> None:
    driver.create("empty")
    assert driver.exists("empty")
    with driver.mounted("empty") as root:
        st = os.lstat(root)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert os.listdir(root) == []
    driver.remove("empty")
    assert not driver.exists("empty")
    assert not (driver.home / LAYERS_DIR / "empty").exists()


def test_create_base_and_snapshot(driver: VfsDriver) -> None:
    create_base(driver, "Base")
    verify_base(driver, "Base")
    driver.create("Snap", "Base")
    verify_base(driver, "Snap")
    assert driver.parent("Snap") == "Base"


def test_deep_layer_read(driver: VfsDriver) -> None:
    depth = 20
    driver.create("layer-0")
    with driver.mounted("layer-0") as root:
        write(root / "testfile.txt", "base content\n")
    for i in range(1, depth + 1):
        layer, parent = f"layer-{i}", f"layer-{i - 1}"
        driver.create(layer, parent)
        with driver.mounted(layer) as root:
            write(root / "top-id", layer)
            write(root / f"layer-{i}" / "layer-id", layer)
            write(root / f"layer-{i}" / "parent-id", parent)

    with driver.mounted(f"layer-{depth}") as root:
        assert (root / "top-id").read_text() == f"layer-{depth}"
        for i in range(1, depth + 1):
            assert (root / f"layer-{i}" / "layer-id").read_text() == f"layer-{i}"
            assert (root / f"layer-{i}" / "parent-id").read_text() == f"layer-{i - 1}"
        assert (root / "testfile.txt").read_text() == "base content\n"
    assert driver.list_layers() == [f"layer-{i}" for i in range(depth, -1, -1)]


# ----------------------------------------------------------------- vfs itself


def test_layout_under_the_home(driver: VfsDriver) -> None:
    driver.create("base")
    layers = driver.home / LAYERS_DIR
    assert stat.S_IMODE(os.stat(driver.home).st_mode) == 0o710
    assert stat.S_IMODE(os.stat(layers).st_mode) == 0o710
    assert os.listdir(layers) == ["base"]
    with driver.mounted("base") as root:
        assert root == layers / "base"
    assert driver.metadata("base") == {"Parent": "", "SourceDir": str(layers / "base")}
    assert os.listdir(driver.store.staging_dir) == []


def test_child_is_an_exact_copy_of_its_parent(driver: VfsDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        os.rmdir(root)  # the layer directory is the tree's root: give it the test tree's
        build_tree(root)
        expected = manifest(root)
    driver.create("child", "base")
    with driver.mounted("child") as root:
        assert manifest(root) == expected
    assert driver.status().extra["last_copy_method"] == driver.copy_method


def test_children_are_independent_of_their_parent(driver: VfsDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root / "etc" / "config", "original\n")
        write(root / "keep", "kept\n")
        before = manifest(root, atimes=False)
    driver.create("child", "base")
    driver.create("sibling", "base")

    with driver.mounted("child") as root:
        (root / "etc" / "config").write_text("changed in child\n")
        (root / "keep").unlink()
        write(root / "new" / "file", "added\n")
        os.chmod(root / "etc", 0o700)
    with driver.mounted("base") as root:
        assert manifest(root, atimes=False) == before
    with driver.mounted("sibling") as root:
        assert manifest(root, atimes=False) == before


def test_remove_refuses_a_layer_with_children_or_mounted(driver: VfsDriver) -> None:
    driver.create("base")
    driver.create("child", "base")
    with pytest.raises(LayerHasChildren):
        driver.remove("base")

    driver.get("child")
    with pytest.raises(LayerBusy):
        driver.remove("child")
    driver.put("child")
    driver.remove("child")
    driver.remove("base")
    assert driver.list_layers() == []
    assert os.listdir(driver.home / LAYERS_DIR) == []
    assert os.listdir(driver.store.staging_dir) == []
    driver.remove("base", missing_ok=True)
    with pytest.raises(LayerNotFound):
        driver.remove("base")


def test_get_put_reference_counts(driver: VfsDriver) -> None:
    driver.create("base")
    first = driver.get("base")
    second = driver.get("base", readonly=True)
    assert first == second == driver.home / LAYERS_DIR / "base"
    driver.put("base")
    assert driver.is_mounted("base")
    driver.put("base")
    assert not driver.is_mounted("base")
    with pytest.raises(NotMounted):
        driver.put("base")


def test_create_on_a_missing_parent(driver: VfsDriver) -> None:
    with pytest.raises(ParentNotFound):
        driver.create("child", "nope")
    assert not driver.store.records()
    assert os.listdir(driver.home / LAYERS_DIR) == []


def test_status_capabilities_and_registry(driver: VfsDriver, tmp_path: Path) -> None:
    status = driver.status()
    assert status.driver == "vfs" and status.backing_filesystem != "unknown"
    assert status.extra["copy_method"] in {m.value for m in CopyMethod}
    caps = driver.capabilities()
    assert not caps.native_diff and caps.reproducible_diff
    assert not caps.quota and caps.supports_devices
    other = open_driver("vfs", tmp_path / "other-home")
    assert isinstance(other, VfsDriver)


def test_a_failed_create_leaves_nothing(tmp_path: Path) -> None:
    # The home is on a small tmpfs: copying the base's 3 MiB file fills it up.
    small = tmp_path / "small"
    with (
        mounted_fs(small, "-t", "tmpfs", "-o", "size=4m", "tmpfs") as mnt,
        VfsDriver(mnt / "home") as driver,
    ):
        driver.create("base")
        with driver.mounted("base") as root:
            (root / "big").write_bytes(os.urandom(3 << 20))
        with pytest.raises(DriverError, match="No space left"):
            driver.create("child", "base")

        assert not driver.exists("child")
        assert driver.store.get(driver.store.records()[0].id) is not None
        assert [r.id for r in driver.store.records()] == ["base"]
        assert os.listdir(driver.home / LAYERS_DIR) == ["base"]
        assert os.listdir(driver.store.staging_dir) == []


CREATE_CHILD = """
import sys
from graphdrivers.drivers.vfs import VfsDriver
VfsDriver(sys.argv[1]).create("child", "base")
"""


def test_kill_during_create_leaves_no_layer(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with VfsDriver(home) as driver:
        driver.create("base")
        with driver.mounted("base") as root:
            for i in range(6000):
                write(root / f"d{i // 200}" / f"f{i}", "x" * (i % 3000))
        staging = driver.store.staging_dir / "child.create"

    proc = subprocess.Popen([sys.executable, "-c", CREATE_CHILD, str(home)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (staging.is_dir() and os.listdir(staging)):  # copying has begun
            assert proc.poll() is None, "the create ended before it could be killed"
            assert time.monotonic() < deadline, "the create never started copying"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    record = LayerRecord.from_json((home / "layers" / "child.json").read_text())
    assert record.state is LayerState.CREATING  # killed mid-create, as intended

    with VfsDriver(home) as driver:
        assert not driver.exists("child")
        assert driver.store.get(record.id) is None
        assert os.listdir(driver.store.staging_dir) == []
        assert os.listdir(home / LAYERS_DIR) == ["base"]
        driver.create("child", "base")  # the id is free again
        with driver.mounted("child") as root:
            assert len(list(root.rglob("f*"))) == 6000


# ----------------------------------------------------------------- the diff side through vfs


def tar_of(entries: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_changes_diff_and_apply_through_vfs(driver: VfsDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root / "dir" / "edit", "old\n")
        write(root / "dir" / "gone", "bye\n")
        write(root / "same", "same\n")
    driver.create("upper", "base")
    with driver.mounted("upper") as root:
        (root / "dir" / "edit").write_text("new!\n")
        (root / "dir" / "gone").unlink()
        write(root / "added", "hello\n")

    assert driver.changes("upper", "base") == [
        Change("/added", Kind.ADD),
        Change("/dir", Kind.MODIFY),
        Change("/dir/edit", Kind.MODIFY),
        Change("/dir/gone", Kind.DELETE),
    ]

    with driver.diff("upper", "base") as stream:
        layer_tar = stream.read()
    size = driver.apply_diff("applied", "base", io.BytesIO(layer_tar))
    assert size == driver.diff_size("applied", "base") == len("new!\n") + len("hello\n")
    with driver.mounted("applied") as root:
        assert (root / "dir" / "edit").read_text() == "new!\n"
        assert not (root / "dir" / "gone").exists()
        assert (root / "added").read_text() == "hello\n"
        assert (root / "same").read_text() == "same\n"
    with driver.diff("upper", "base") as again:
        assert again.read() == layer_tar  # reproducible


def test_apply_onto_an_empty_vfs_layer(driver: VfsDriver) -> None:
    size = driver.apply_diff("img", None, tar_of({"etc/hostname": b"box\n", "bin/sh": b"#!"}))
    assert size == len(b"box\n") + len(b"#!")
    with driver.mounted("img") as root:
        assert (root / "etc" / "hostname").read_bytes() == b"box\n"
        assert stat.S_IMODE(os.stat(root / "bin" / "sh").st_mode) == 0o644
    driver.create("child", "img")
    assert driver.changes("child", "img") == []
