"""The union driver: the shared union layout merged by real fusemount daemons, one per mount.

Most checks run twice, once per whiteout format fusemount writes into ``diff/``. The native diff
(a walk of ``diff/``) is held to the naive one (a comparison of two mounted trees) for both
formats and for the kernel overlay driver, and the merged tree of one stack is compared across
fusemount, fuse-overlayfs and kernel overlayfs.
"""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from graphdrivers.conformance.manifest import assert_same_tree, manifest
from graphdrivers.driver import Driver
from graphdrivers.drivers.overlay import OverlayDriver, kernel_has_overlay
from graphdrivers.drivers.union import FUSERMOUNT, UnionDriver, find_daemon, wait_for_exit
from graphdrivers.drivers.unionfs.layout import DAEMON_PID_FILE, LINK_DIR, UnionLayout
from graphdrivers.drivers.unionfs.nativediff import export_upper
from graphdrivers.errors import InvalidOption, LayerHasChildren, NotMounted
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.ids import LayerId
from graphdrivers.whiteout import OVERLAY_OPAQUE_XATTR, WHITEOUT_OPAQUE

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="device /dev/fuse"),
    pytest.mark.skipif(shutil.which(FUSERMOUNT) is None, reason=f"tool {FUSERMOUNT}"),
]

FORMATS = ["overlay", "aufs"]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    leftovers = mounts_under(tmp_path)
    for entry in leftovers:
        subprocess.run([FUSERMOUNT, "-u", "-z", str(entry.target)], check=False)
    assert not leftovers, f"mounts left behind: {[str(e.target) for e in leftovers]}"


@pytest.fixture(params=FORMATS)
def whiteout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver(home: Path, whiteout: str) -> Iterator[UnionDriver]:
    drv = UnionDriver(home, {"whiteout": whiteout})
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


def daemon_pid(home: Path, layer: str) -> int:
    return int((home / layer / DAEMON_PID_FILE).read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------- lifecycle


def test_layout_and_base_root(driver: UnionDriver, home: Path) -> None:
    driver.create("base")
    driver.create("child", "base")
    st = os.stat(home / "base/diff")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    short = UnionLayout(home).short_name(LayerId("base"))
    assert os.readlink(home / LINK_DIR / short) == "../base/diff"
    assert (home / "child/lower").read_text() == f"l/{short}"

    with driver.mounted("base") as root:
        assert os.listdir(root) == []
        st = os.stat(root)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)


def test_child_sees_parent_and_writes_go_to_its_diff(driver: UnionDriver, home: Path) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "etc/motd", "base\n")
        os.chmod(root, 0o711)
    driver.create("child", "base")
    with driver.mounted("child") as root:
        assert (root / "etc/motd").read_text() == "base\n"
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
        write(root, "etc/motd", "child\n")
    assert (home / "base/diff/etc/motd").read_text() == "base\n"
    assert (home / "child/diff/etc/motd").read_text() == "child\n"


def test_deletions_use_the_chosen_whiteout_format(
    driver: UnionDriver, home: Path, whiteout: str
) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "gone", "x")
        write(root, "dir/old", "x")
    driver.create("child", "base")
    with driver.mounted("child") as root:
        os.unlink(root / "gone")
        shutil.rmtree(root / "dir")
        os.mkdir(root / "dir")
        write(root, "dir/new", "y")
        assert sorted(os.listdir(root)) == ["dir"]
        assert os.listdir(root / "dir") == ["new"]

    diff = home / "child/diff"
    if whiteout == "overlay":
        st = os.lstat(diff / "gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(diff / "dir", OVERLAY_OPAQUE_XATTR) == b"y"
    else:
        assert (diff / ".wh.gone").is_file() and not os.path.lexists(diff / "gone")
        assert (diff / "dir" / WHITEOUT_OPAQUE).is_file()
        assert OVERLAY_OPAQUE_XATTR not in os.listxattr(diff / "dir")


def test_readonly_and_frozen_layers_refuse_writes(driver: UnionDriver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "f", "1")
    with driver.mounted("base", readonly=True) as root, pytest.raises(OSError) as info:
        write(root, "g", "2")
    assert info.value.errno == 30  # EROFS

    driver.create("child", "base")
    with driver.mounted("base") as root:
        assert (root / "f").read_text() == "1"
        with pytest.raises(OSError) as info:
            write(root, "g", "2")
        assert info.value.errno == 30
    with pytest.raises(LayerHasChildren):
        driver.remove("base")


# ---------------------------------------------------------------------------- daemons


def test_one_daemon_per_mount_and_put_waits_for_it(driver: UnionDriver, home: Path) -> None:
    driver.create("a")
    driver.create("b")
    root_a = driver.get("a")
    driver.get("a")
    driver.get("b")
    pid_a, pid_b = daemon_pid(home, "a"), daemon_pid(home, "b")
    assert pid_a != pid_b and alive(pid_a) and alive(pid_b)
    assert find_daemon(root_a) == pid_a

    driver.put("a")
    assert is_mounted(root_a) and alive(pid_a)
    driver.put("a")
    assert not is_mounted(root_a)
    assert not alive(pid_a)
    assert not (home / "a" / DAEMON_PID_FILE).exists()
    with pytest.raises(NotMounted):
        driver.put("a")
    driver.put("b")
    assert not alive(pid_b)


def test_a_killed_daemon_is_replaced_on_the_next_get(driver: UnionDriver, home: Path) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "f", "kept")
    driver.create("c", "base")
    root = driver.get("c")
    write(root, "mine", "1")
    pid = daemon_pid(home, "c")

    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, 10)
    assert driver.get("c") == root
    new_pid = daemon_pid(home, "c")
    assert new_pid != pid and alive(new_pid)
    assert (root / "f").read_text() == "kept"
    assert (root / "mine").read_text() == "1"

    driver.put("c")
    assert is_mounted(root)  # two gets, one put
    driver.put("c")
    assert not is_mounted(root)


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from graphdrivers.drivers.union import UnionDriver
    driver = UnionDriver(sys.argv[1], {"whiteout": sys.argv[2]})
    driver.create("a")
    driver.create("b", "a")
    driver.get("b")
    driver.get("a")
    print(open(os.path.join(sys.argv[1], "a", "daemon.pid")).read().strip(),
          open(os.path.join(sys.argv[1], "b", "daemon.pid")).read().strip(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_cleanup_after_a_crashed_process(home: Path, whiteout: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, str(home), whiteout],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert {e.target for e in mounts_under(home)} == {home / "a/merged", home / "b/merged"}
    assert all(alive(p) for p in pids)

    driver = UnionDriver(home, {"whiteout": whiteout})
    driver.cleanup()
    assert mounts_under(home) == []
    assert not any(alive(p) for p in pids)
    driver.cleanup()


def test_options_are_checked(home: Path) -> None:
    with pytest.raises(InvalidOption):
        UnionDriver(home, {"whiteout": "both"})
    with pytest.raises(InvalidOption):
        UnionDriver(home, {"mount_program": "fuse-overlayfs", "whiteout": "aufs"})
    with pytest.raises(InvalidOption):
        UnionDriver(home, {"mount_program": "no-such-program-here"})


@pytest.mark.parametrize("made_with", FORMATS)
def test_a_home_keeps_the_whiteout_format_it_was_made_with(home: Path, made_with: str) -> None:
    """Regression: an aufs home opened without the option wrote overlay whiteouts into it."""
    other = "overlay" if made_with == "aufs" else "aufs"
    driver = UnionDriver(home, {"whiteout": made_with})
    try:
        driver.create("base")
        with driver.mounted("base") as root:
            write(root, "gone", "x")
    finally:
        driver.cleanup()
    assert (home / ".whiteout-format").read_text() == f"{made_with}\n"

    driver = UnionDriver(home)  # no option: the home's own format, whatever the default
    try:
        assert driver.whiteout_format == made_with
        assert driver.status().extra["whiteout_format"] == made_with
        driver.create("child", "base")
        with driver.mounted("child") as root:
            os.unlink(root / "gone")
    finally:
        driver.cleanup()
    diff = home / "child" / "diff"
    if made_with == "aufs":
        assert os.listdir(diff) == [".wh.gone"]
    else:
        assert os.listdir(diff) == ["gone"]
        assert stat.S_ISCHR(os.lstat(diff / "gone").st_mode)

    with pytest.raises(InvalidOption) as caught:
        UnionDriver(home, {"whiteout": other})
    message = str(caught.value)
    assert f"whiteout={other} contradicts" in message
    assert f"made with whiteout={made_with}" in message
    assert (home / ".whiteout-format").read_text() == f"{made_with}\n"
    assert mounts_under(home) == []


def test_an_aufs_home_refuses_a_program_writing_overlay_whiteouts(home: Path) -> None:
    UnionDriver(home, {"whiteout": "aufs"}).cleanup()
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("tool fuse-overlayfs")
    with pytest.raises(InvalidOption, match="whiteout=aufs needs fusemount"):
        UnionDriver(home, {"mount_program": "fuse-overlayfs"})


def test_status_names_the_format(driver: UnionDriver, whiteout: str) -> None:
    status = driver.status()
    assert status.driver == "union"
    assert status.extra["whiteout_format"] == whiteout
    assert driver.capabilities().whiteout_format == whiteout


# ---------------------------------------------------------------------------- native diff


def populate_base(root: Path) -> None:
    write(root, "a", "alpha")
    write(root, "same", "untouched")
    write(root, "d/f", "in d")
    write(root, "d/sub/deep", "deep")
    write(root, "e/g", "g")
    write(root, "e/h", "h")
    write(root, "tree/x/y", "y")
    write(root, "links/one", "linked")
    os.link(root / "links/one", root / "links/two")
    os.symlink("a", root / "sym")
    os.mkfifo(root / "fifo")
    write(root, "setuid", "s")
    os.chmod(root / "setuid", 0o4755)


def change_child(root: Path) -> None:
    write(root, "a", "alpha, changed")
    os.chmod(root / "e/h", 0o600)
    os.chown(root / "e/h", 12, 34)
    os.unlink(root / "e/g")
    shutil.rmtree(root / "d")
    write(root, "d/new", "new in d")
    shutil.rmtree(root / "tree")
    write(root, "added/file", "added")
    os.link(root / "added/file", root / "added/file-link")
    os.unlink(root / "sym")
    os.symlink("same", root / "sym")
    write(root, "xattr", "x")
    os.setxattr(root / "xattr", "user.note", b"value")


def read_all(stream: IO[bytes]) -> bytes:
    with stream as s:
        return s.read()


def check_native_matches_naive(driver: Driver) -> None:
    """Native and naive diffs of one layer apply to equal trees with equal changes.

    Each layer is held mounted read-only while it is checked, so that the mounts the diff side
    makes are reference counts, not new daemons.
    """
    driver.create("base")
    with driver.mounted("base") as root:
        populate_base(root)
    driver.create("child", "base")
    with driver.mounted("child") as root:
        change_child(root)

    with driver.mounted("base", readonly=True), driver.mounted("child", readonly=True) as root:
        native = read_all(driver.diff("child", "base"))
        assert read_all(driver.diff("child", "base")) == native  # deterministic bytes
        naive = read_all(Driver.diff(driver, "child", "base"))
        expected_tree = manifest(root)
        expected_changes = driver.changes("child", "base")
        expected_size = driver.diff_size("child", "base")

        with tarfile.open(fileobj=io.BytesIO(native)) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert "d/.wh..wh..opq" in names and "e/.wh.g" in names and ".wh.tree" in names
        assert not [k for m in members for k in m.pax_headers if "fusemount" in k]

        for layer, data in (("from-native", native), ("from-naive", naive)):
            size = driver.apply_diff(layer, "base", io.BytesIO(data))
            with driver.mounted(layer, readonly=True) as applied:
                assert size == driver.diff_size(layer, "base") == expected_size
                assert_same_tree(expected_tree, manifest(applied), f"{layer} against child")
                assert driver.changes(layer, "base") == expected_changes


def test_native_diff_matches_naive(driver: UnionDriver) -> None:
    check_native_matches_naive(driver)


@pytest.mark.skipif(not kernel_has_overlay(), reason="kernel filesystem overlay")
def test_native_diff_matches_naive_on_kernel_overlay(tmp_path: Path) -> None:
    driver = OverlayDriver(tmp_path / "home")
    try:
        check_native_matches_naive(driver)
    finally:
        driver.cleanup()
    assert mounts_under(tmp_path) == []


def test_native_diff_converts_every_marker_of_both_formats(tmp_path: Path) -> None:
    upper = tmp_path / "diff"
    for rel in ("ovl-opaque", "aufs-opaque", "fo-opaque", "plain", ".wh..wh.plnk"):
        (upper / rel).mkdir(parents=True)
    os.mknod(upper / "ovl-gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.setxattr(upper / "ovl-opaque", OVERLAY_OPAQUE_XATTR, b"y")
    (upper / "ovl-opaque/kept").write_text("k")
    (upper / ".wh.aufs-gone").write_text("")
    (upper / "aufs-opaque" / WHITEOUT_OPAQUE).write_text("")
    (upper / ".wh..wh.plnk/123.456").write_text("aufs hardlink store")
    os.mknod(upper / "fo-opaque/.wh..opq", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(upper / "fo-opaque", OVERLAY_OPAQUE_XATTR, b"y")
    (upper / "fo-opaque" / WHITEOUT_OPAQUE).write_text("")
    (upper / "plain/back").write_text("recreated")
    (upper / "plain/.wh.back").write_text("")  # hides the lower one only: dropped
    os.setxattr(upper / "plain/back", "user.fusemount.origin", b"1:2")
    os.setxattr(upper / "plain/back", "user.kept", b"yes")
    # An opaque marker is kept only where the layers below show a directory to hide.
    (upper / "zz-new-opaque").mkdir()
    os.setxattr(upper / "zz-new-opaque", OVERLAY_OPAQUE_XATTR, b"y")
    lower = tmp_path / "lower"
    for rel in ("ovl-opaque", "aufs-opaque", "fo-opaque"):
        (lower / rel).mkdir(parents=True)

    with tarfile.open(fileobj=io.BytesIO(b"".join(export_upper(upper, [lower])))) as tar:
        got = [
            (m.name, m.type, {k: v for k, v in m.pax_headers.items() if "xattr" in k})
            for m in tar.getmembers()
        ]
    reg, dirt = tarfile.REGTYPE, tarfile.DIRTYPE
    assert [(n, t) for n, t, _ in got] == [
        (".wh.aufs-gone", reg),
        ("aufs-opaque", dirt),
        ("aufs-opaque/.wh..wh..opq", reg),
        ("fo-opaque", dirt),
        ("fo-opaque/.wh..wh..opq", reg),
        (".wh.ovl-gone", reg),
        ("ovl-opaque", dirt),
        ("ovl-opaque/.wh..wh..opq", reg),
        ("ovl-opaque/kept", reg),
        ("plain", dirt),
        ("plain/back", reg),
        ("zz-new-opaque", dirt),
    ]
    assert got[-2][2] == {"SCHILY.xattr.user.kept": "yes"}
    assert all(not pax for name, _, pax in got[:-2] + got[-1:])


def test_apply_diff_writes_the_drivers_whiteouts(
    driver: UnionDriver, home: Path, whiteout: str
) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        write(root, "gone", "x")
        write(root, "dir/old", "x")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (
            ("dir", tarfile.DIRTYPE),
            ("dir/.wh..wh..opq", tarfile.REGTYPE),
            (".wh.gone", tarfile.REGTYPE),
            ("dir/n", tarfile.REGTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(info, io.BytesIO(b""))
    driver.apply_diff("top", "base", io.BytesIO(buf.getvalue()))

    diff = home / "top/diff"
    if whiteout == "overlay":
        assert stat.S_ISCHR(os.lstat(diff / "gone").st_mode)
        assert os.getxattr(diff / "dir", OVERLAY_OPAQUE_XATTR) == b"y"
    else:
        assert (diff / ".wh.gone").is_file()
        assert (diff / "dir" / WHITEOUT_OPAQUE).is_file()
    with driver.mounted("top") as root:
        assert os.listdir(root) == ["dir"]
        assert os.listdir(root / "dir") == ["n"]


# ---------------------------------------------------------------------------- depth


@pytest.mark.slow
def test_a_deep_chain_reads_every_layer(driver: UnionDriver) -> None:
    depth = 600
    parent = None
    for i in range(depth):
        driver.create(f"l{i}", parent)
        diff = UnionLayout(driver.home).diff_dir(LayerId(f"l{i}"))
        (diff / "top-id").write_text(f"l{i}")
        (diff / f"layer-{i}").write_text(parent or "")
        parent = f"l{i}"
    assert parent is not None
    with driver.mounted(parent) as root:
        assert (root / "top-id").read_text() == parent
        assert (root / "layer-0").read_text() == ""
        assert (root / f"layer-{depth - 1}").read_text() == f"l{depth - 2}"
        assert len(os.listdir(root)) == depth + 1


# ---------------------------------------------------------------------------- references


def reference_stack(driver: Driver) -> None:
    driver.create("base")
    with driver.mounted("base") as root:
        populate_base(root)
    driver.create("child", "base")
    with driver.mounted("child") as root:
        change_child(root)
    driver.create("top", "child")


def test_same_merged_tree_as_fuse_overlayfs_and_kernel_overlay(tmp_path: Path) -> None:
    makers: dict[str, Callable[[Path], Driver]] = {
        "fusemount": lambda h: UnionDriver(h, {"whiteout": "overlay"}),
        "fuse-overlayfs": lambda h: UnionDriver(h, {"mount_program": "fuse-overlayfs"}),
    }
    if kernel_has_overlay():
        makers["kernel"] = OverlayDriver
    trees = {}
    for name, make in makers.items():
        if name == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
            pytest.fail("tool fuse-overlayfs (the reference) is missing")
        driver = make(tmp_path / name)
        try:
            reference_stack(driver)
            with driver.mounted("top", readonly=True) as root:
                trees[name] = manifest(root)
        finally:
            driver.cleanup()
    for name, tree in trees.items():
        assert_same_tree(trees["fusemount"], tree, f"{name} against fusemount")
    assert mounts_under(tmp_path) == []
