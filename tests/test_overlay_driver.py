"""The overlay driver: kernel overlayfs over the shared union layout, mounted for real as root."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdrivers.driver import Driver
from graphdrivers.drivers.overlay import OverlayDriver, kernel_has_overlay
from graphdrivers.drivers.unionfs.layout import DIFF_DIR, LINK_DIR, LOWER_FILE, UnionLayout
from graphdrivers.drivers.unionfs.mountapi import LEGACY_OPTIONS_MAX, count_lowers, legacy_options
from graphdrivers.errors import (
    DriverError,
    InvalidLayerId,
    InvalidOption,
    LayerBusy,
    LayerHasChildren,
    MountError,
    NotMounted,
    NotSupported,
)
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.whiteout import OVERLAY_OPAQUE_XATTR

pytestmark = [
    pytest.mark.skipif(not kernel_has_overlay(), reason="kernel filesystem overlay"),
    pytest.mark.skipif(os.geteuid() != 0, reason="privilege root (CAP_SYS_ADMIN)"),
]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    leftovers = mounts_under(tmp_path)
    for entry in leftovers:
        subprocess.run(["umount", "-l", str(entry.target)], check=False)
    assert not leftovers, f"mounts left behind: {[str(e.target) for e in leftovers]}"


@pytest.fixture
def driver(home: Path) -> Iterator[OverlayDriver]:
    drv = OverlayDriver(home)
    try:
        yield drv
    finally:
        drv.cleanup()


def write(root: Path, rel: str, data: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


def is_mounted(path: Path) -> bool:
    return any(e.target == path for e in mounts_under(path))


# ---------------------------------------------------------------------------- layout


def test_base_and_child_layout_on_disk(driver: OverlayDriver, home: Path) -> None:
    driver.create("base")
    driver.create("child", "base")
    layout = UnionLayout(home)

    diff = home / "base" / DIFF_DIR
    st = os.stat(diff)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert os.listdir(diff) == []
    assert stat.S_IMODE(os.stat(home / "base").st_mode) == 0o710
    assert stat.S_IMODE(os.stat(home / LINK_DIR).st_mode) == 0o700

    short = layout.short_name("base")
    assert len(short) == 26
    assert os.readlink(home / LINK_DIR / short) == "../base/diff"
    assert os.path.samefile(home / LINK_DIR / short, diff)
    assert not (home / "base" / LOWER_FILE).exists()
    assert (home / "child" / LOWER_FILE).read_text() == f"l/{short}"
    assert layout.depth("child") == 2

    for reserved in ("l", "empty"):
        with pytest.raises(InvalidLayerId):
            driver.create(reserved)


def test_child_root_copies_parent_root_owner_and_mode(driver: OverlayDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        os.chmod(root, 0o711)
        os.chown(root, 7, 8)
    driver.create("child", "base")
    driver.create("grandchild", "child")
    with driver.mounted("grandchild") as root:
        st = os.stat(root)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 7, 8)


def test_writes_go_to_the_layers_own_diff(driver: OverlayDriver, home: Path) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "etc/motd", "base\n")
        write(root, "keep", "k")
    driver.create("child", "base")
    with driver.mounted("child") as root:
        assert (root / "etc/motd").read_text() == "base\n"
        write(root, "etc/motd", "child\n")
        write(root, "new", "n")

    assert (home / "base/diff/etc/motd").read_text() == "base\n"
    assert (home / "child/diff/etc/motd").read_text() == "child\n"
    assert sorted(os.listdir(home / "child/diff")) == ["etc", "new"]


def test_write_to_a_lower_hardlink_keeps_the_group_whole_in_diff(
    driver: OverlayDriver, home: Path
) -> None:
    """index=on keeps the group one inode in the mount; put links every name into diff/."""
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "d/a", "before")
        os.link(root / "d/a", root / "b")
    driver.create("child", "base")
    with driver.mounted("child") as root:
        write(root, "d/a", "after!")
        assert (root / "b").read_text() == "after!"
    a, b = os.lstat(home / "child/diff/d/a"), os.lstat(home / "child/diff/b")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), "the group split in diff/"
    assert os.listdir(home / "child/work/index") == []
    assert (home / "base/diff/b").read_text() == "before"

    driver.create("grandchild", "child")  # child is now a read-only lower without an index
    with driver.mounted("grandchild") as root:
        a, b = os.lstat(root / "d/a"), os.lstat(root / "b")
        assert (root / "b").read_text() == "after!"
        assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    with tarfile.open(fileobj=driver.diff("child"), mode="r|") as tar:
        members = {m.name: (m.type, m.linkname) for m in tar}
    assert members == {
        "b": (tarfile.REGTYPE, ""),
        "d": (tarfile.DIRTYPE, ""),
        "d/a": (tarfile.LNKTYPE, "b"),
    }


def test_deletions_are_overlay_whiteouts_in_diff(driver: OverlayDriver, home: Path) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "gone", "x")
        write(root, "dir/old", "x")
    driver.create("child", "base")
    with driver.mounted("child") as root:
        os.unlink(root / "gone")
        os.unlink(root / "dir/old")
        os.rmdir(root / "dir")
        os.mkdir(root / "dir")
        write(root, "dir/new", "y")
        assert sorted(os.listdir(root)) == ["dir"]
        assert os.listdir(root / "dir") == ["new"]

    st = os.lstat(home / "child/diff/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(home / "child/diff/dir", OVERLAY_OPAQUE_XATTR) == b"y"


# ---------------------------------------------------------------------------- mounting


def test_get_put_reference_counts(driver: OverlayDriver, home: Path) -> None:
    driver.create("a")
    merged = home / "a/merged"
    assert driver.get("a") == merged
    assert driver.get("a") == merged
    driver.put("a")
    assert is_mounted(merged)
    driver.put("a")
    assert not is_mounted(merged)
    with pytest.raises(NotMounted):
        driver.put("a")


def test_readonly_get_refuses_writes(driver: OverlayDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "f", "1")
    driver.create("leaf", "base")
    for layer in ("base", "leaf"):
        with driver.mounted(layer, readonly=True) as root:
            assert (root / "f").read_text() == "1"
            with pytest.raises(OSError) as info:
                write(root, "g", "2")
            assert info.value.errno == 30  # EROFS


def test_a_layer_with_children_is_frozen(driver: OverlayDriver) -> None:
    driver.create("base")
    driver.create("child", "base")
    with driver.mounted("base") as root, pytest.raises(OSError) as info:
        write(root, "f", "1")
    assert info.value.errno == 30  # EROFS
    with driver.mounted("child") as root:
        write(root, "f", "1")


def test_remove_refuses_mounted_and_parents(driver: OverlayDriver, home: Path) -> None:
    driver.create("base")
    driver.create("child", "base")
    short = UnionLayout(home).short_name("child")
    with pytest.raises(LayerHasChildren):
        driver.remove("base")
    with driver.mounted("child"), pytest.raises(LayerBusy):
        driver.remove("child")
    driver.remove("child")
    assert not (home / "child").exists()
    assert not os.path.lexists(home / LINK_DIR / short)
    driver.remove("base")
    assert os.listdir(home / LINK_DIR) == []


def build_chain(driver: OverlayDriver, depth: int) -> list[str]:
    """moby's DeepLayerRead: every layer rewrites top-id and adds its own marker dir."""
    ids = [f"layer-{i}" for i in range(depth)]
    parent = None
    for lid in ids:
        driver.create(lid, parent)
        with driver.mounted(lid) as root:
            write(root, "top-id", lid)
            write(root, f"{lid}/parent-id", parent or "")
            if parent is None:
                write(root, "testfile.txt", "base content")
        parent = lid
    return ids


def test_chain_of_128_layers_reads_every_layer(driver: OverlayDriver, home: Path) -> None:
    ids = build_chain(driver, 128)
    with driver.mounted(ids[-1]) as root:
        assert count_lowers(root) == 127
        assert (root / "top-id").read_text() == ids[-1]
        assert (root / "testfile.txt").read_text() == "base content"
        for i, lid in enumerate(ids):
            assert (root / lid / "parent-id").read_text() == (ids[i - 1] if i else "")
    with driver.mounted(ids[-1], readonly=True) as root:
        pass
    driver.create("view", ids[-1])
    with driver.mounted(ids[-1]) as root:
        assert count_lowers(root) == 128  # frozen: its own diff joins the lowers


@pytest.mark.parametrize("api", ["fd", "path"])
def test_more_than_a_page_of_lowers_mounts_the_whole_stack(home: Path, api: str) -> None:
    driver = OverlayDriver(home, {"mount_api": api})
    try:
        ids = [f"layer-{i:03d}-with-a-long-name" for i in range(150)]
        parent = None
        for lid in ids:
            driver.create(lid, parent)
            parent = lid
        lowers = UnionLayout(home).lower_dirs(ids[-1])
        assert len(legacy_options(lowers, None, None, {})) > LEGACY_OPTIONS_MAX

        bottom = UnionLayout(home).diff_dir(ids[0])
        (bottom / "from-the-bottom").write_text("deep")
        with driver.mounted(ids[-1]) as root:
            assert count_lowers(root) == 149
            assert (root / "from-the-bottom").read_text() == "deep"
    finally:
        driver.cleanup()


def test_legacy_mount_refuses_options_longer_than_a_page(home: Path) -> None:
    driver = OverlayDriver(home, {"mount_api": "legacy"})
    try:
        driver.create("base")
        driver.create("child", "base")
        with driver.mounted("child") as root:
            assert count_lowers(root) == 1

        parent = "child"
        for i in range(100):
            driver.create(f"l{i}", parent)
            parent = f"l{i}"
        with pytest.raises(MountError) as info:
            driver.get(parent)
        assert info.value.expected == LEGACY_OPTIONS_MAX
        assert not is_mounted(home / parent / "merged")
    finally:
        driver.cleanup()


def test_max_depth_is_enforced(home: Path) -> None:
    class Shallow(OverlayDriver):
        max_depth = 3

    driver = Shallow(home)
    driver.create("a")
    driver.create("b", "a")
    driver.create("c", "b")
    with pytest.raises(DriverError) as info:
        driver.create("d", "c")
    assert (info.value.expected, info.value.got) == (3, 4)
    assert not driver.exists("d")
    assert not (home / "d").exists()


def test_the_kernel_limit_of_500_layers(driver: OverlayDriver) -> None:
    parent = None
    for i in range(500):
        driver.create(f"l{i}", parent)
        parent = f"l{i}"
    with driver.mounted(parent, readonly=True) as root:
        assert count_lowers(root) == 500
    with pytest.raises(DriverError):
        driver.create("one-too-many", parent)


# ---------------------------------------------------------------------------- recovery

CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from graphdrivers.drivers.overlay import OverlayDriver
    driver = OverlayDriver(sys.argv[1])
    driver.create("a")
    driver.create("b", "a")
    driver.get("b")
    driver.get("a")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_cleanup_unmounts_what_a_crashed_process_left(home: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(home)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert {e.target for e in mounts_under(home)} == {home / "a/merged", home / "b/merged"}

    driver = OverlayDriver(home)
    assert driver.list_layers() == ["b", "a"]
    driver.cleanup()
    assert mounts_under(home) == []
    driver.cleanup()  # idempotent


def test_get_replaces_a_mount_left_by_a_crashed_process(home: Path) -> None:
    subprocess.run([sys.executable, "-c", CRASHER, str(home)], check=False)
    driver = OverlayDriver(home)
    try:
        with driver.mounted("b") as root:
            write(root, "f", "1")
            assert len([e for e in mounts_under(home) if e.target == root]) == 1
        assert not is_mounted(home / "b/merged")
    finally:
        driver.cleanup()


HOLDER = textwrap.dedent(
    """
    import sys
    from graphdrivers.drivers.overlay import OverlayDriver
    driver = OverlayDriver(sys.argv[1])
    driver.create("held")
    driver.get("held")
    print("mounted", flush=True)
    sys.stdin.readline()
    driver.put("held")
    driver.cleanup()
    """
)


def test_mounts_of_another_live_process_are_left_alone(home: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "mounted\n"
        driver = OverlayDriver(home)
        driver.cleanup()
        assert is_mounted(home / "held/merged")
        with pytest.raises(LayerBusy) as info:
            driver.get("held")
        assert str(holder.pid) in str(info.value)
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    assert not is_mounted(home / "held/merged")


def test_lost_short_links_are_rebuilt(home: Path) -> None:
    driver = OverlayDriver(home)
    driver.create("a")
    driver.create("b", "a")
    short = UnionLayout(home).short_name("a")
    os.unlink(home / LINK_DIR / short)
    os.symlink("../nowhere/diff", home / LINK_DIR / "STRAY")

    driver = OverlayDriver(home)
    assert sorted(os.listdir(home / LINK_DIR)) == sorted(
        [short, UnionLayout(home).short_name("b")]
    )
    with driver.mounted("b"):
        pass
    driver.cleanup()


# ---------------------------------------------------------------------------- host and options


def test_without_cap_sys_admin_it_is_not_supported(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from graphdrivers.drivers.overlay import OverlayDriver
        from graphdrivers.errors import NotSupported
        try:
            OverlayDriver(sys.argv[1])
        except NotSupported as exc:
            print(exc.missing)
        """
    )
    command = ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", script]
    out = subprocess.run(
        [*command, str(tmp_path / "h")], capture_output=True, text=True, check=True
    )
    assert "CAP_SYS_ADMIN" in out.stdout
    assert not (tmp_path / "h").exists()
    assert issubclass(NotSupported, DriverError)


def test_unknown_options_are_refused(home: Path) -> None:
    with pytest.raises(InvalidOption):
        OverlayDriver(home, {"mount_api": "carrier-pigeon"})
    with pytest.raises(InvalidOption):
        OverlayDriver(home, {"colour": "blue"})


def test_status_and_metadata(driver: OverlayDriver, home: Path) -> None:
    driver.create("base")
    driver.create("child", "base")
    status = driver.status()
    assert (status.driver, status.layers) == ("overlay", 2)
    assert status.extra["whiteout_format"] == "overlay"
    assert status.extra["max_depth"] == "500"

    meta = driver.metadata("child")
    assert meta["Parent"] == "base"
    assert meta["UpperDir"] == str(home / "child/diff")
    assert os.path.samefile(meta["LowerDir"], home / "base/diff")
    caps = driver.capabilities()
    assert caps.native_diff and caps.max_depth == 500


# ---------------------------------------------------------------------------- native diff


def test_native_diff_of_a_base_layer_is_byte_identical_to_the_naive_one(
    driver: OverlayDriver,
) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "a/x", "x")
        write(root, "a.b", "sorts between a and a/x")
        write(root, "big", "B" * (3 << 20))
        os.link(root / "a/x", root / "a-link")
        os.symlink("a/x", root / "sym")
        os.mkfifo(root / "fifo")
        os.setxattr(root / "big", "user.note", b"kept")

    with driver.diff("base") as stream:
        native = stream.read()
    with Driver.diff(driver, "base") as stream:
        naive = stream.read()
    assert native == naive


def test_diff_against_a_grandparent_is_naive_and_complete(driver: OverlayDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "gone", "x")
    driver.create("mid", "base")
    with driver.mounted("mid") as root:
        write(root, "from-mid", "m")
    driver.create("top", "mid")
    with driver.mounted("top") as root:
        os.unlink(root / "gone")
        write(root, "from-top", "t")

    with driver.diff("top", "base") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        names = sorted(tar.getnames())
    assert names == [".wh.gone", "from-mid", "from-top"]
    assert [str(c) for c in driver.changes("top", "base")] == [
        "A /from-mid",
        "A /from-top",
        "D /gone",
    ]


def test_apply_diff_unpacks_into_diff_with_overlay_whiteouts(
    driver: OverlayDriver, home: Path
) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "gone", "x")
        write(root, "dir/old", "x")
    driver.create("child", "base")
    with driver.mounted("child") as root:
        os.unlink(root / "gone")
        shutil.rmtree(root / "dir")
        write(root, "dir/new", "12345")
    with driver.diff("child", "base") as stream:
        data = stream.read()

    size = driver.apply_diff("copy", "base", io.BytesIO(data))
    assert size == 5 == driver.diff_size("copy", "base")
    diff = home / "copy/diff"
    assert stat.S_ISCHR(os.lstat(diff / "gone").st_mode)
    assert os.getxattr(diff / "dir", OVERLAY_OPAQUE_XATTR) == b"y"
    assert not (diff / ".wh.gone").exists()
    with driver.mounted("copy") as root:
        assert sorted(os.listdir(root)) == ["dir"]
        assert os.listdir(root / "dir") == ["new"]
