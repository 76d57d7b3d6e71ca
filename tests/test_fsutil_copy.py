"""copy_tree against a manifest built independently of it, on every file type it must keep.

The manifest (:func:`manifest`) walks a tree with ``os.fwalk`` and ``os.stat``/``os.listxattr``
calls of its own; it records type, mode, owner, size, device number, nanosecond times, a digest
of the content, the link target, the xattrs and which names share an inode. A copy is right when
its manifest equals the source's, the source's own stat (inode, ctime included) is unchanged, and
the few things a manifest cannot see (holes, one inode per hardlink group) are checked on their
own. Runs as root: owners, devices, trusted.* and security.capability need it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.errors import DriverError
from graphdrivers.fsutil import xattrs
from graphdrivers.fsutil.copy import FD_WINDOW, CopyMethod, copy_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, mknod, xattrs)")

MIB = 1 << 20
SPARSE_SIZE = 8 * MIB
# security.capability v2 with the effective flag, permitting CAP_NET_BIND_SERVICE (10).
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
MTIME_NS = 1_600_000_000_123_456_789
# Access times in the future: with relatime, reading the source (to digest it) updates an atime
# only when it is not newer than the mtime and ctime, so these survive the manifest's own reads.
ATIME_NS = time.time_ns() + 86_400 * 10**9 + 987_654_321


# ----------------------------------------------------------------- the independent manifest


def manifest(root: Path, *, atimes: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything a faithful copy must reproduce, per path relative to ``root``.

    Leave out access times (``atimes=False``) for trees whose atimes are not in the future
    (see :data:`ATIME_NS`): listing a directory may update its atime.
    """
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    entries["."] = describe(os.stat(root, follow_symlinks=False), None, os.fspath(root))
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            entries[rel] = describe(st, dirfd, name)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    for names in inodes.values():
        for rel in names:
            entries[rel] += (tuple(sorted(names)),)
    if not atimes:
        entries = {rel: e[:ATIME_FIELD] + e[ATIME_FIELD + 1 :] for rel, e in entries.items()}
    return entries


ATIME_FIELD = 8  # index of st_atime_ns in what describe() returns


def describe(st: os.stat_result, dirfd: int | None, name: str) -> tuple[Any, ...]:
    path = f"/proc/self/fd/{dirfd}/{name}" if dirfd is not None else name
    names = os.listxattr(path, follow_symlinks=False)
    xattr_items = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = digest(dirfd, name)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(name, dir_fd=dirfd)
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    nlink = st.st_nlink if stat.S_ISDIR(st.st_mode) else 0
    return (
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        size,
        rdev,
        nlink,
        st.st_mtime_ns,
        st.st_atime_ns,
        content,
        xattr_items,
    )


def digest(dirfd: int | None, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME, dir_fd=dirfd)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def stat_snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """Inode, mode, owner, size and all three times of every entry (the source must keep them)."""
    out = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in [".", *dirnames, *filenames]:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            out[os.path.join(dirpath, name)] = (
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_atime_ns,
                st.st_ctime_ns,
            )
    return out


def entry_counts(root: Path) -> dict[str, int]:
    """Entries per type below ``root`` (an independent count to check the copy's stats by)."""
    counts = {"dirs": 0, "inodes": 0, "names": 0, "symlinks": 0, "specials": 0}
    seen: set[int] = set()
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        counts["dirs"] += len(dirnames)
        for name in filenames:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                counts["names"] += 1
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    counts["inodes"] += 1
            elif stat.S_ISLNK(st.st_mode):
                counts["symlinks"] += 1
            else:
                counts["specials"] += 1
    return counts


# ----------------------------------------------------------------- the source tree


def settime(path: Path | str, dir_fd: int | None = None, offset: int = 0) -> None:
    os.utime(path, ns=(ATIME_NS + offset, MTIME_NS + offset), dir_fd=dir_fd, follow_symlinks=False)


def build_tree(root: Path) -> None:
    """Every file type and attribute copy_tree promises to keep (see the module docstring)."""
    root.mkdir()
    (root / "file").write_bytes(b"hello world\n" * 100)
    (root / "empty").touch()
    with open(root / "sparse", "wb") as f:
        f.write(b"head" * 1024)
        f.seek(SPARSE_SIZE - 4096)
        f.write(b"tail" * 1024)

    for name, mode in (("sticky", 0o1777), ("d0705", 0o705)):
        (root / name).mkdir()
        os.chmod(root / name, mode)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_text("in dir\n")

    os.symlink("dir/file", root / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("nowhere/at/all", root / "dangling")
    (root / "h1").write_text("three names, one inode\n")
    os.link(root / "h1", root / "dir" / "h2")
    os.link(root / "h1", root / "dir" / "sub" / "h3")

    os.mkfifo(root / "fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "socket"))
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(7, 200))

    (root / "user1000").write_text("owned by 1000\n")
    os.chown(root / "user1000", 1000, 1000)
    os.chown(root / "d0705", 1, 2)
    os.lchown(root / "dangling", 1000, 1000)
    (root / "setuid").write_bytes(b"\x7fELF pretend\n")
    os.chown(root / "setuid", 1000, 1000)
    os.chmod(root / "setuid", 0o4755)
    (root / "setgid").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "setgid", 1, 2)
    os.chmod(root / "setgid", 0o2755)

    os.setxattr(root / "file", "user.origin", b"test suite")
    os.setxattr(root / "dir", "user.dir-note", b"\x00binary\xff")
    os.setxattr(root / "setuid", "security.capability", CAPABILITY)
    os.setxattr(root / "d0705", "trusted.overlay.opaque", b"y")
    os.setxattr(
        root / "abs-link", "trusted.link-note", b"on the link itself", follow_symlinks=False
    )

    deep = build_deep(root, component="d" * 49, depth=70)  # about 3,500 bytes below root
    assert len(deep) > 3400

    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, topdown=False):
        for i, name in enumerate(filenames + dirnames):
            settime(name, dirfd, offset=i)
        if dirpath == os.fspath(root):
            settime(root)


def build_deep(root: Path, component: str, depth: int) -> str:
    """``depth`` nested directories below ``root``, made through fds; a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(component, dir_fd=fd)
            child = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)
    return "/".join([component] * depth + ["leaf"])


@pytest.fixture
def source(tmp_path: Path) -> Path:
    build_tree(tmp_path / "src")
    return tmp_path / "src"


@contextlib.contextmanager
def mounted_fs(target: Path, *mount_args: str) -> Iterator[Path]:
    """Mount a filesystem of our own at ``target`` for the duration of the block."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *mount_args, os.fspath(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", os.fspath(target)], check=True)


# ----------------------------------------------------------------- tests


def test_copy_reproduces_the_manifest(source: Path, tmp_path: Path) -> None:
    expected = manifest(source)
    copy_tree(source, tmp_path / "dst")
    got = manifest(tmp_path / "dst")

    assert sorted(got) == sorted(expected)
    wrong = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    assert not wrong

    kinds = {k: stat.S_IFMT(v[0]) for k, v in got.items()}
    assert stat.S_ISSOCK(kinds["socket"])  # kept a socket, not turned into a FIFO
    assert stat.S_ISFIFO(kinds["fifo"])
    assert got["setuid"][1] == 0o4755 and got["setuid"][2:4] == (1000, 1000)
    assert dict(got["setuid"][10])["security.capability"] == CAPABILITY


def test_copy_stats_match_an_independent_count(source: Path, tmp_path: Path) -> None:
    counts = entry_counts(source)
    stats = copy_tree(source, tmp_path / "dst")

    assert stats.dirs == counts["dirs"]
    assert stats.files == counts["inodes"]
    assert stats.hardlinks == counts["names"] - counts["inodes"] == 2
    assert stats.symlinks == counts["symlinks"]
    assert stats.fifos + stats.sockets + stats.devices == counts["specials"] == 4
    assert stats.xattrs == 5
    assert stats.owners_not_kept == 0
    assert stats.method in (CopyMethod.REFLINK, CopyMethod.COPY_FILE_RANGE)


def test_copy_keeps_holes(source: Path, tmp_path: Path) -> None:
    copy_tree(source, tmp_path / "dst")
    src_st = os.stat(source / "sparse")
    dst_st = os.stat(tmp_path / "dst" / "sparse")

    assert dst_st.st_size == SPARSE_SIZE
    assert src_st.st_blocks * 512 <= 64 * 1024  # the source really is sparse
    assert dst_st.st_blocks * 512 <= 64 * 1024  # and so is the copy: 8 KiB of data, not 8 MiB
    with open(tmp_path / "dst" / "sparse", "rb") as f:
        assert f.read(4096) == b"head" * 1024
        f.seek(SPARSE_SIZE // 2)
        assert f.read(4096) == bytes(4096)
        f.seek(SPARSE_SIZE - 4096)
        assert f.read() == b"tail" * 1024


def test_hardlinks_share_one_inode_in_the_copy(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    copy_tree(source, dst)
    names = [dst / "h1", dst / "dir" / "h2", dst / "dir" / "sub" / "h3"]
    inodes = {os.lstat(p).st_ino for p in names}

    assert len(inodes) == 1
    assert os.lstat(names[0]).st_nlink == 3
    assert inodes.isdisjoint({os.lstat(source / "h1").st_ino})  # a new inode, not the source's


def test_source_is_unchanged(source: Path, tmp_path: Path) -> None:
    before = stat_snapshot(source)
    copy_tree(source, tmp_path / "dst")
    assert stat_snapshot(source) == before


def test_tree_deeper_than_path_max_and_the_fd_window(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    depth = FD_WINDOW + 40
    deep = build_deep(src, component="x" * 100, depth=depth)
    assert len(deep) > os.pathconf(src, "PC_PATH_MAX")

    stats = copy_tree(src, tmp_path / "dst")
    assert stats.dirs == depth and stats.files == 1
    assert manifest(tmp_path / "dst") == manifest(src)


def test_read_write_fallback_between_filesystems(source: Path, tmp_path: Path) -> None:
    # copy_file_range refuses (EXDEV) to copy from tmpfs to another filesystem type.
    with mounted_fs(tmp_path / "tmpfs", "-t", "tmpfs", "-o", "size=64m", "tmpfs") as mnt:
        dst = mnt / "dst"
        stats = copy_tree(source, dst)
        assert stats.methods == {CopyMethod.READ_WRITE.value: stats.files - 1}  # "empty": none
        assert manifest(dst) == manifest(source)
        assert os.stat(dst / "sparse").st_blocks * 512 <= 64 * 1024


def test_reflink_on_btrfs(tmp_path: Path) -> None:
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("needs mkfs.btrfs (btrfs-progs)")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(256 * MIB)
    subprocess.run(["mkfs.btrfs", "-q", os.fspath(image)], check=True)

    with mounted_fs(tmp_path / "mnt", "-o", "loop", os.fspath(image)) as mnt:
        (mnt / "src").mkdir()
        (mnt / "src" / "big").write_bytes(os.urandom(4 * MIB))
        stats = copy_tree(mnt / "src", mnt / "dst")
        assert stats.methods == {CopyMethod.REFLINK.value: 1}
        assert (mnt / "dst" / "big").read_bytes() == (mnt / "src" / "big").read_bytes()
        os.sync()
        frag = subprocess.run(
            ["filefrag", "-v", os.fspath(mnt / "dst" / "big")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "shared" in frag  # the copy's extents are the source's


def test_destination_must_not_exist(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    with pytest.raises(DriverError, match="already exists") as info:
        copy_tree(source, dst)
    assert info.value.path == dst
    assert (dst / "keep").read_text() == "mine"


def test_destination_inside_source_is_refused(source: Path) -> None:
    with pytest.raises(DriverError, match="inside the source"):
        copy_tree(source, source / "dir" / "copy")
    assert not (source / "dir" / "copy").exists()


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="cannot open source") as info:
        copy_tree(tmp_path / "nope", tmp_path / "dst")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not (tmp_path / "dst").exists()


def test_a_failed_copy_leaves_no_partial_destination(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(MIB))
    with mounted_fs(tmp_path / "small", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as mnt:
        with pytest.raises(DriverError, match="failed") as info:
            copy_tree(src, mnt / "dst")
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        assert not (mnt / "dst").exists()


def test_copy_as_an_unprivileged_user_keeps_what_it_may(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine").write_text("mine\n")
    (src / "roots").write_text("root's, world-readable\n")
    os.chmod(src / "roots", 0o644)
    os.chown(src / "mine", 1000, 1000)
    os.chown(src, 1000, 1000)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 1000, 1000)
    assert run_as(1000, src, out) == (2, 1)
    assert os.lstat(out / "dst" / "roots").st_uid == 1000  # could not give it to root
    assert (out / "dst" / "roots").read_text() == "root's, world-readable\n"


def run_as(uid: int, src: Path, out: Path) -> tuple[int, int]:
    """copy_tree(src, out/dst) in a forked child that dropped root for ``uid``.

    The child opens both directories before dropping root and reaches them through
    /proc/self/fd, so the root-only directories above pytest's tmp_path are not in the way.
    Returns (files, owners_not_kept) of the copy.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
            out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            stats = copy_tree(f"/proc/self/fd/{src_fd}", f"/proc/self/fd/{out_fd}/dst")
            os.write(write_end, f"{stats.files} {stats.owners_not_kept}".encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out_text = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out_text
    files, not_kept = out_text.split()
    return int(files), int(not_kept)


def test_xattr_policy_by_namespace() -> None:
    policy, rules = xattrs.policy, xattrs.XattrPolicy
    assert policy("user.anything") is rules.REQUIRED
    assert policy("security.capability") is rules.REQUIRED
    assert policy("trusted.overlay.opaque") is rules.REQUIRED
    assert policy("system.posix_acl_access") is rules.REQUIRED
    assert policy("security.selinux") is rules.BEST_EFFORT
    assert policy("security.ima") is rules.BEST_EFFORT
    assert policy("system.nfs4_acl") is rules.SKIP
    assert policy("btrfs.compression") is rules.SKIP


def test_xattr_helpers_never_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("t")
    os.symlink("target", tmp_path / "link")
    xattrs.set_xattr(tmp_path / "link", "trusted.on-link", b"1")

    assert xattrs.list_xattrs(tmp_path / "link") == ["trusted.on-link"]
    assert xattrs.list_xattrs(tmp_path / "target") == []
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert xattrs.read_xattrs(xattrs.at(fd, "link")) == {"trusted.on-link": b"1"}
    finally:
        os.close(fd)
