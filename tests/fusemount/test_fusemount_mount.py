"""Real mounts: the fusemount daemon runs as a subprocess on a temp mountpoint; every test
unmounts it (fusermount3 -u, then -z) and waits for the daemon's pid in a finally block."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fusemount_helpers import FUSEMOUNT, is_mounted, mounted, wait_gone

from graphdrivers import whiteout as wh

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
)


@pytest.fixture
def stack(tmp_path: Path) -> dict[str, Path]:
    dirs = {n: tmp_path / n for n in ("l1", "l2", "upper", "work", "mnt")}
    for path in dirs.values():
        path.mkdir()
    l1, l2 = dirs["l1"], dirs["l2"]
    (l2 / "a").write_bytes(b"bottom")
    (l1 / "a").write_bytes(b"top")
    (l2 / "gone").write_bytes(b"g")
    os.mknod(l1 / "gone", stat.S_IFCHR, 0)
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "sub" / "f").write_bytes(b"deep")
    (l2 / "h1").write_bytes(b"linked")
    os.link(l2 / "h1", l2 / "d" / "h2")
    return dirs


def lowers(s: dict[str, Path]) -> list[Path]:
    return [s["l1"], s["l2"]]


def test_reads_through_layers_and_hides_whiteouts(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        assert (mnt / "a").read_bytes() == b"top"
        assert sorted(os.listdir(mnt)) == ["a", "d", "h1"]
        assert not (mnt / "gone").exists()
        assert (mnt / "d" / "sub" / "f").read_bytes() == b"deep"
        entry = next(e for e in os.scandir(mnt) if e.name == "d")
        assert entry.inode() == os.stat(mnt / "d").st_ino, "d_ino != st_ino"
        for e in os.scandir(mnt):
            assert e.inode() == os.lstat(e.path).st_ino
        assert os.statvfs(mnt).f_namemax == 255


def test_copy_up_keeps_attrs_sparse_and_xattrs(stack: dict[str, Path]) -> None:
    src = stack["l2"] / "big"
    with open(src, "wb") as f:
        f.write(b"start")
        f.seek(64 << 20)
        f.write(b"end")
    os.chown(src, 1000, 1001)
    os.chmod(src, 0o2755)
    os.setxattr(src, "user.tag", b"v1")
    os.utime(src, ns=(1_500_000_000_111, 1_600_000_000_222))
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        ino = os.stat(mnt / "big").st_ino
        os.setxattr(mnt / "big", "user.more", b"v2")
        st = os.stat(mnt / "big")
        assert st.st_ino == ino
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o2755)
        assert st.st_mtime_ns == 1_600_000_000_222
        assert os.getxattr(mnt / "big", "user.tag") == b"v1"
        assert "user.fusemount.origin" not in os.listxattr(mnt / "big")
    copy = stack["upper"] / "big"
    assert copy.stat().st_blocks * 512 < 1 << 20, "the copy is not sparse"
    assert os.getxattr(copy, "user.more") == b"v2"
    with open(copy, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) < 64 << 20


def test_hardlinks_stay_one_inode_after_copy_up(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        before = os.stat(mnt / "d" / "h2")
        assert before.st_nlink == 2
        with open(mnt / "h1", "ab") as f:
            f.write(b"+more")
        after1, after2 = os.stat(mnt / "h1"), os.stat(mnt / "d" / "h2")
        assert after1.st_ino == after2.st_ino == before.st_ino
        assert after1.st_nlink == after2.st_nlink == 2
        assert (mnt / "d" / "h2").read_bytes() == b"linked+more"
    assert (stack["upper"] / "h1").stat().st_ino == (stack["upper"] / "d" / "h2").stat().st_ino


def test_inode_numbers_are_stable_across_remount(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    paths = ["a", "d", "d/sub", "d/sub/f", "h1"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        first = {p: os.stat(mnt / p).st_ino for p in paths}
        (mnt / "d" / "sub" / "f").write_bytes(b"changed")
        (mnt / "new").write_bytes(b"n")
        first["new"] = os.stat(mnt / "new").st_ino
        assert os.stat(mnt / "d" / "sub" / "f").st_ino == first["d/sub/f"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        assert {p: os.stat(mnt / p).st_ino for p in first} == first


def test_rename_of_a_lower_directory(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        ino = os.stat(mnt / "d" / "sub" / "f").st_ino
        os.rename(mnt / "d", mnt / "e")
        assert sorted(os.listdir(mnt)) == ["a", "e", "h1"]
        assert (mnt / "e" / "sub" / "f").read_bytes() == b"deep"
        assert os.stat(mnt / "e" / "sub" / "f").st_ino == ino
        assert os.stat(mnt / "e" / "h2").st_ino == os.stat(mnt / "h1").st_ino
        subprocess.run(["mv", str(mnt / "e"), str(mnt / "f")], check=True)
        assert (mnt / "f" / "sub" / "f").read_bytes() == b"deep"
    d = stack["upper"] / "d"
    assert wh.is_overlay_whiteout(d.lstat())


def test_rename_of_a_lower_file_over_another_lower_file(stack: dict[str, Path]) -> None:
    """The replaced file's inode gets a SETATTR (ctime) after the rename; it must not copy
    the old lower file up over the renamed one."""
    (stack["l2"] / "over").write_bytes(b"the renamed file")
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        os.rename(mnt / "over", mnt / "a")
        assert (mnt / "a").read_bytes() == b"the renamed file"
    assert (stack["upper"] / "a").read_bytes() == b"the renamed file"
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        assert (mnt / "a").read_bytes() == b"the renamed file"
        assert not (mnt / "over").exists()


def test_name_too_long_and_deep_paths(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    # A lower tree deeper than PATH_MAX, built through directory fds.
    component = b"c" * 200
    depth = 30  # 30 * 201 bytes > 4096
    fd = os.open(stack["l2"], os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(component, dir_fd=fd)
        nfd = os.open(component, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"leaf data")
    os.close(fd)
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        with pytest.raises(OSError) as exc:
            (mnt / ("x" * 256)).write_bytes(b"")
        assert exc.value.errno == errno.ENAMETOOLONG
        (mnt / ("y" * 255)).write_bytes(b"ok")
        fd = os.open(mnt, os.O_RDONLY)
        for _ in range(depth):
            nfd = os.open(component, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(b"leaf", os.O_RDWR, dir_fd=fd)
        os.pwrite(leaf, b"LEAF", 0)
        assert os.pread(leaf, 100, 0) == b"LEAF data"
        os.close(leaf)
        os.close(fd)


def test_open_before_copy_up_sees_new_data_and_mmap(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    (stack["l2"] / "m").write_bytes(b"0" * 8192)
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]):
        reader = open(mnt / "a", "rb")  # noqa: SIM115
        assert reader.read() == b"top"
        with open(mnt / "a", "r+b") as w:
            w.write(b"TOP!")
        reader.seek(0)
        assert reader.read() == b"TOP!"
        reader.close()
        with open(mnt / "m", "r+b") as f:
            mm = mmap.mmap(f.fileno(), 8192)
            mm[0:4] = b"mmap"
            mm.flush()
            mm.close()
        assert (mnt / "m").read_bytes()[:5] == b"mmap0"
    assert (stack["upper"] / "m").read_bytes()[:5] == b"mmap0"
    assert (stack["upper"] / "a").read_bytes() == b"TOP!"


def test_lowerdir_only_is_read_only(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack)):
        assert (mnt / "a").read_bytes() == b"top"
        for attempt in (
            lambda: (mnt / "new").write_bytes(b"x"),
            lambda: os.unlink(mnt / "a"),
            lambda: os.mkdir(mnt / "dir"),
            lambda: os.chmod(mnt / "a", 0o600),
        ):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
    assert sorted(os.listdir(stack["l1"])) == ["a", "gone"]


def test_aufs_format_upper(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"], "whiteout=aufs"):
        os.unlink(mnt / "a")
        subprocess.run(["rm", "-rf", str(mnt / "d")], check=True)
        os.mkdir(mnt / "d")
        assert os.listdir(mnt / "d") == []
        assert sorted(os.listdir(mnt)) == ["d", "h1"]
    upper = stack["upper"]
    assert (upper / ".wh.a").is_file()
    assert (upper / "d" / wh.WHITEOUT_OPAQUE).is_file()
    assert not any(
        wh.is_overlay_whiteout(Path(dp, n).lstat())
        for dp, dns, fns in os.walk(upper)
        for n in dns + fns
    )


def test_sigkill_leaves_a_dead_mount_that_cleanup_removes(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]) as pid:
        assert (mnt / "a").read_bytes() == b"top"
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        with pytest.raises(OSError) as exc:
            os.statvfs(mnt)
        assert exc.value.errno == errno.ENOTCONN
        assert is_mounted(mnt)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True)
        assert not is_mounted(mnt)


def test_sigterm_unmounts_and_exits(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    with mounted(mnt, lowers(stack), stack["upper"], stack["work"]) as pid:
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
        assert not is_mounted(mnt)


def test_mount_helper_form_and_errors(stack: dict[str, Path]) -> None:
    mnt = stack["mnt"]
    opts = f"lowerdir={stack['l1']}:{stack['l2']},pidfile={stack['mnt'].parent / 'p'}"
    proc = subprocess.run(
        [*FUSEMOUNT, "mylayers", str(mnt), "-o", opts + ",fsname=mylayers"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pid = int((stack["mnt"].parent / "p").read_text())
    try:
        assert (mnt / "a").read_bytes() == b"top"
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            line = next(ln for ln in f if ln.split()[4] == str(mnt))
        assert "fuse.fusemount" in line and "mylayers" in line
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert wait_gone(pid)

    bad = subprocess.run([*FUSEMOUNT, "-o", "upperdir=/x", str(mnt)], capture_output=True)
    assert bad.returncode == 2 and b"lowerdir" in bad.stderr
    bad = subprocess.run([*FUSEMOUNT, "-o", "lowerdir=/x,frob=1", str(mnt)], capture_output=True)
    assert bad.returncode == 2 and b"frob" in bad.stderr
    missing = stack["mnt"].parent / "missing"
    bad = subprocess.run(
        [*FUSEMOUNT, "-o", f"lowerdir={missing}", str(mnt)], capture_output=True, timeout=60
    )
    assert bad.returncode == 1 and b"missing" in bad.stderr
    assert not is_mounted(mnt)


def test_thousand_layer_chain(tmp_path: Path) -> None:
    layer_dirs = []
    for i in range(1000):
        d = tmp_path / "layers" / f"{i:04d}"
        d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(str(i).encode())
        (d / "top").write_bytes(str(i).encode())
        layer_dirs.append(d)
    mnt = tmp_path / "mnt"
    top_first = list(reversed(layer_dirs))
    with mounted(mnt, top_first):
        assert (mnt / "top").read_bytes() == b"999"
        assert (mnt / "f0").read_bytes() == b"0"
        assert len(os.listdir(mnt)) == 1001


def test_module_entry_point_prints_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "fusemount.main", "--help"], capture_output=True)
    assert proc.returncode == 0 and b"lowerdir" not in proc.stderr
