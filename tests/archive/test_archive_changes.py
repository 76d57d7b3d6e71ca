"""changes_dirs and changes_size against real trees, with moby's and c/storage's scenarios."""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from archive_helpers import copy_tree

from graphdrivers.archive import apply_layer, changes_dirs, changes_size, export_changes
from graphdrivers.driver import Change, Kind

A, C, D = Kind.ADD, Kind.MODIFY, Kind.DELETE


def ch(kind: Kind, path: str) -> Change:
    return Change(path, kind)


def content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def capability(*caps: int) -> bytes:
    """A version-2 ``security.capability`` value granting ``caps`` as permitted+effective."""
    permitted = sum(1 << c for c in caps)
    return struct.pack("<IIIII", 0x02000001, permitted, 0, 0, 0)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "base"
    root.mkdir()
    return root


def upper_of(base: Path) -> Path:
    upper = base.parent / "upper"
    copy_tree(base, upper)
    return upper


def test_moby_driver_test_changes(base: Path) -> None:
    """moby graphtest DriverTestChanges: 20 files, then modify/add/delete in turn."""
    (base / "directory-0").mkdir()
    for j in range(20):
        (base / "directory-0" / f"file-{j}").write_bytes(content(64, 3 + j))
    upper = upper_of(base)

    expected = [ch(C, "/directory-0")]
    for j in range(20):
        if j % 3 == 0:
            path = f"/directory-0/file-{j}"
            (upper / path[1:]).write_bytes(content(64, 6 + j))
            os.utime(upper / path[1:], ns=(1, 10**18 + j))
            expected.append(ch(C, path))
        elif j % 3 == 1:
            path = f"/directory-0/file-6-{j}"
            (upper / path[1:]).write_bytes(content(64, 6 + j))
            expected.append(ch(A, path))
        else:
            path = f"/directory-0/file-{j}"
            (upper / path[1:]).unlink()
            expected.append(ch(D, path))

    assert changes_dirs(upper, base) == sorted(expected)


def test_parent_none_is_all_add_sorted(base: Path) -> None:
    (base / "b").mkdir()
    (base / "b" / "x").write_text("x")
    (base / "a b").write_text("space sorts before slash")
    (base / "a").mkdir()
    (base / "a" / "c").write_text("c")
    got = changes_dirs(base, None)
    assert got == [ch(A, p) for p in ["/a", "/a b", "/a/c", "/b", "/b/x"]]


@pytest.mark.parametrize("depth", range(10))
def test_echo_delete_and_recreate(base: Path, depth: int) -> None:
    """containers/storage DriverTestEcho: delete at each depth, then recreate the subtree."""
    chain = [f"subdir{i}" for i in range(1, 10)]
    paths = ["/" + "/".join(chain[: i + 1]) for i in range(9)]
    paths.append(paths[-1] + "/file")
    (base / paths[8][1:]).mkdir(parents=True)
    (base / paths[9][1:]).write_text("file")

    child = base.parent / "child"
    copy_tree(base, child)
    victim = child / paths[depth][1:]
    if victim.is_dir():
        shutil.rmtree(victim)
    else:
        victim.unlink()
    expected = [ch(C, p) for p in paths[:depth]] + [ch(D, paths[depth])]
    assert changes_dirs(child, base) == expected

    grandchild = base.parent / "grandchild"
    copy_tree(child, grandchild)
    (grandchild / paths[8][1:]).mkdir(parents=True, exist_ok=True)
    (grandchild / paths[9][1:]).write_text("file again")
    expected = [ch(C, p) for p in paths[:depth]] + [ch(A, p) for p in paths[depth:]]
    assert changes_dirs(grandchild, child) == expected

    # The diff of the delete applies onto a copy of the base and leaves no difference.
    applied = base.parent / "applied"
    copy_tree(base, applied)
    diff = b"".join(export_changes(child, changes_dirs(child, base)))
    apply_layer(applied, io.BytesIO(diff))
    assert changes_dirs(applied, child) == []


def test_directory_mtime_only_is_not_a_change(base: Path) -> None:
    (base / "d").mkdir()
    (base / "d" / "f").write_text("f")
    upper = upper_of(base)
    os.utime(upper / "d", ns=(5, 5_000_000_123))
    assert changes_dirs(upper, base) == []


def test_root_is_never_reported(base: Path) -> None:
    (base / "f").write_text("f")
    upper = upper_of(base)
    os.chmod(upper, 0o700)
    os.chown(upper, 5, 5)
    assert changes_dirs(upper, base) == []
    (upper / "g").write_text("g")
    assert changes_dirs(upper, base) == [ch(A, "/g")]


def test_deleted_tree_is_one_delete(base: Path) -> None:
    (base / "gone" / "deep" / "er").mkdir(parents=True)
    (base / "gone" / "deep" / "er" / "f").write_text("f")
    upper = upper_of(base)
    shutil.rmtree(upper / "gone")
    assert changes_dirs(upper, base) == [ch(D, "/gone")]


def test_capability_change_is_modify(base: Path) -> None:
    (base / "bin").mkdir()
    (base / "bin" / "ping").write_bytes(b"\x7fELF")
    os.setxattr(base / "bin" / "ping", "security.capability", capability(13))
    upper = upper_of(base)
    assert changes_dirs(upper, base) == []
    os.setxattr(upper / "bin" / "ping", "security.capability", capability(12, 13))
    assert changes_dirs(upper, base) == [ch(C, "/bin"), ch(C, "/bin/ping")]


def test_user_xattr_and_symlink_target_are_modify(base: Path) -> None:
    (base / "f").write_text("f")
    os.symlink("aaaa", base / "l")
    os.utime(base / "l", ns=(7, 7_000_000_000), follow_symlinks=False)
    upper = upper_of(base)
    os.setxattr(upper / "f", "user.note", b"hello")
    os.unlink(upper / "l")
    os.symlink("bbbb", upper / "l")
    os.utime(upper / "l", ns=(7, 7_000_000_000), follow_symlinks=False)
    assert changes_dirs(upper, base) == [ch(C, "/f"), ch(C, "/l")]


def test_subsecond_mtime_rule(base: Path) -> None:
    for name in ("whole", "frac"):
        (base / name).write_text("same")
    os.utime(base / "whole", ns=(0, 1_700_000_000_000_000_000))
    os.utime(base / "frac", ns=(0, 1_700_000_000_300_000_000))
    upper = upper_of(base)
    # Same second, one side without nanoseconds (as after a round trip through plain ustar).
    os.utime(upper / "whole", ns=(0, 1_700_000_000_500_000_000))
    assert changes_dirs(upper, base) == []
    os.utime(upper / "frac", ns=(0, 1_700_000_000_500_000_000))
    assert changes_dirs(upper, base) == [ch(C, "/frac")]


def test_type_changes(base: Path) -> None:
    (base / "file2dir").write_text("x")
    (base / "dir2file" / "sub").mkdir(parents=True)
    (base / "dir2file" / "sub" / "f").write_text("x")
    (base / "file2link").write_text("x")
    upper = upper_of(base)

    (upper / "file2dir").unlink()
    (upper / "file2dir" / "inner").mkdir(parents=True)
    shutil.rmtree(upper / "dir2file")
    (upper / "dir2file").write_text("now a file")
    (upper / "file2link").unlink()
    os.symlink("file2dir", upper / "file2link")

    assert changes_dirs(upper, base) == [
        ch(C, "/dir2file"),
        ch(C, "/file2dir"),
        ch(A, "/file2dir/inner"),
        ch(C, "/file2link"),
    ]


def test_hardlink_added_and_size_counted_once(base: Path) -> None:
    (base / "d").mkdir()
    (base / "d" / "orig").write_bytes(b"x" * 1000)
    upper = upper_of(base)
    os.link(upper / "d" / "orig", upper / "d" / "second")
    (upper / "new").write_bytes(b"y" * 300)
    os.link(upper / "new", upper / "new-link")
    os.symlink("new", upper / "sym")

    changes = changes_dirs(upper, base)
    assert changes == [
        ch(C, "/d"),
        ch(A, "/d/second"),
        ch(A, "/new"),
        ch(A, "/new-link"),
        ch(A, "/sym"),
    ]
    # /d/second (1000, its peer is outside the changes) + /new once (300); symlinks count 0.
    assert changes_size(upper, changes) == 1300


def test_mode_owner_and_content_changes(base: Path) -> None:
    for name in ("mode", "owner", "size", "mtime", "same"):
        (base / name).write_text("abc")
        os.utime(base / name, ns=(1, 1_500_000_000_000_000_000))
    upper = upper_of(base)
    os.chmod(upper / "mode", 0o4755)
    os.chown(upper / "owner", 1000, 1000)
    (upper / "size").write_text("abcd")
    os.utime(upper / "size", ns=(1, 1_500_000_000_000_000_000))
    os.utime(upper / "mtime", ns=(1, 1_500_000_001_000_000_000))
    assert changes_dirs(upper, base) == [
        ch(C, "/mode"),
        ch(C, "/mtime"),
        ch(C, "/owner"),
        ch(C, "/size"),
    ]
    assert changes_size(upper, changes_dirs(upper, base)) == 3 + 3 + 3 + 4


def test_fifo_and_device_rdev(base: Path) -> None:
    os.mkfifo(base / "fifo")
    os.mknod(base / "null", 0o666 | 0o020000, os.makedev(1, 3))
    upper = upper_of(base)
    assert changes_dirs(upper, base) == []
    os.unlink(upper / "null")
    os.mknod(upper / "null", 0o666 | 0o020000, os.makedev(1, 5))
    os.utime(
        upper / "null",
        ns=(os.lstat(base / "null").st_atime_ns, os.lstat(base / "null").st_mtime_ns),
    )
    assert changes_dirs(upper, base) == [ch(C, "/null")]
