"""Differential tests: the same operation scripts on kernel overlayfs, fuse-overlayfs and
fusemount, comparing the merged trees and what each left in its upper dir.

Where the references behave worse (a hardlinked lower file split by copy-up, EXDEV on renaming
a lower directory) the tests assert their behaviour explicitly next to ours."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusemount_helpers import is_mounted, mounted

from fusemount.xattrs import is_hidden
from graphdrivers import whiteout as wh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount -t overlay)")

Mounter = Callable[[Path, list[Path], Path, Path], contextlib.AbstractContextManager[object]]


@contextlib.contextmanager
def kernel_overlay(mnt: Path, lowers: list[Path], upper: Path, work: Path) -> Iterator[object]:
    opts = "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off".format(
        ":".join(map(str, lowers)), upper, work
    )
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield None
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextlib.contextmanager
def fuse_overlayfs(mnt: Path, lowers: list[Path], upper: Path, work: Path) -> Iterator[object]:
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs (Debian package fuse-overlayfs) is not installed")
    opts = "lowerdir={},upperdir={},workdir={}".format(":".join(map(str, lowers)), upper, work)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["fuse-overlayfs", "-o", opts, str(mnt)], check=True)
    try:
        yield None
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@contextlib.contextmanager
def fusemount(mnt: Path, lowers: list[Path], upper: Path, work: Path) -> Iterator[object]:
    with mounted(mnt, lowers, upper, work) as pid:
        yield pid


IMPLEMENTATIONS: dict[str, Mounter] = {
    "kernel": kernel_overlay,
    "fuse-overlayfs": fuse_overlayfs,
    "fusemount": fusemount,
}


# -- trees ------------------------------------------------------------------------------------


def build_lowers(root: Path) -> list[Path]:
    """Two lowers (top first) with files, dirs, symlinks, an overlay whiteout, an opaque dir."""
    l1, l2 = root / "l1", root / "l2"
    for d in (l1, l2):
        d.mkdir(parents=True)
    for name in ("l2file", "exec", "owned", "del", "ren", "trunc", "xa"):
        (l2 / name).write_bytes(name.encode() * 3)
    (l2 / "tree" / "deep").mkdir(parents=True)
    (l2 / "tree" / "deep" / "f").write_bytes(b"f")
    (l2 / "movedir" / "inner").mkdir(parents=True)
    (l2 / "movedir" / "inner" / "g").write_bytes(b"g")
    (l2 / "movedir" / "top").write_bytes(b"t")
    (l2 / "emptydir").mkdir()
    (l2 / "hidden").write_bytes(b"hidden by l1")
    (l2 / "opq").mkdir()
    (l2 / "opq" / "below").write_bytes(b"hidden by the opaque dir")
    os.symlink("l2file", l2 / "sym")
    (l1 / "l2file").write_bytes(b"l1 version")
    os.mknod(l1 / "hidden", stat.S_IFCHR, 0)
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", wh.OVERLAY_OPAQUE_XATTR, b"y")
    (l1 / "opq" / "above").write_bytes(b"a")
    (l1 / "movedir").mkdir()
    (l1 / "movedir" / "from_l1").write_bytes(b"1")
    return [l1, l2]


def scenario(m: Path) -> None:
    """A container's first minutes: edits of every kind on a merged tree."""
    (m / "new.txt").write_bytes(b"new")
    with open(m / "l2file", "ab") as f:
        f.write(b"+")
    os.chmod(m / "exec", 0o700)
    os.chown(m / "owned", 1000, 1000)
    os.unlink(m / "del")
    subprocess.run(["rm", "-rf", str(m / "tree")], check=True)
    os.mkdir(m / "tree")
    (m / "tree" / "fresh").write_bytes(b"fresh")
    os.symlink("target", m / "link")
    os.makedirs(m / "a" / "b" / "c")
    os.rename(m / "ren", m / "renamed")
    os.truncate(m / "trunc", 1)
    subprocess.run(["mv", str(m / "movedir"), str(m / "moved")], check=True)
    os.setxattr(m / "xa", "user.k", b"v")
    os.rmdir(m / "emptydir")
    (m / "opq" / "new_in_opaque").write_bytes(b"n")


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """Path -> (type, mode, owner, size, content digest or link target, user xattrs).

    Our origin xattr (``user.fusemount.origin``) is left out: fusemount hides it, kernel
    overlayfs reading our upper shows it like any user xattr."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode):
                detail: object = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            else:
                detail = None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            attrs = tuple(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                    if k.startswith("user.") and not is_hidden(k)
                )
            )
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                st.st_mode,
                st.st_uid,
                st.st_gid,
                size,
                detail,
                attrs,
            )
    return out


def upper_semantics(upper: Path, lowers: list[Path]) -> set[tuple[str, str]]:
    """What an upper dir means, format-neutral: whiteouts, opaque dirs and content entries.

    fuse-overlayfs writes ``.wh..wh..opq`` and a ``.wh..opq`` device besides the opaque xattr,
    and makes every new directory opaque; an opaque mark where no lower layer has anything to
    hide means nothing, so it is dropped here."""
    opaque: set[str] = set()
    kinds: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(upper).as_posix()
            st = path.lstat()
            parent = path.parent.relative_to(upper).as_posix()
            if name in (wh.WHITEOUT_OPAQUE, ".wh..opq"):
                opaque.add(parent)
            elif wh.is_whiteout_name(name):
                kinds[str(Path(parent, wh.whited_out_name(name)))] = "whiteout"
            elif wh.is_overlay_whiteout(st):
                kinds[rel] = "whiteout"
            elif stat.S_ISDIR(st.st_mode):
                kinds[rel] = "dir"
                names = os.listxattr(path)
                if any(
                    os.getxattr(path, a) == b"y" for a in wh.OVERLAY_OPAQUE_XATTRS if a in names
                ):
                    opaque.add(rel)
            else:
                kinds[rel] = "file"
    for rel in opaque:
        if any(os.path.lexists(lower / rel) for lower in lowers):
            kinds[rel] = "opaque dir"
    return set(kinds.items())


def run_one(tmp: Path, impl: str, script: Callable[[Path], None]) -> tuple[dict, set, Path]:
    base = tmp / impl
    lowers = build_lowers(base / "lower")
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    upper.mkdir()
    work.mkdir()
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work):
        script(mnt)
        tree = manifest(mnt)
    return tree, upper_semantics(upper, lowers), base


# -- same results -----------------------------------------------------------------------------


def test_same_merged_tree_and_upper_meaning_as_the_references(tmp_path: Path) -> None:
    results = {impl: run_one(tmp_path, impl, scenario) for impl in IMPLEMENTATIONS}
    ours_tree, ours_upper, _ = results["fusemount"]
    assert "hidden" not in ours_tree and "opq/below" not in ours_tree
    assert ours_tree["moved/inner/g"][5] == hashlib.sha256(b"g").hexdigest()
    for impl in ("kernel", "fuse-overlayfs"):
        tree, upper, _ = results[impl]
        assert tree == ours_tree, f"merged tree differs from {impl}"
        assert upper == ours_upper, f"upper dir means something else than {impl}'s"


def test_kernel_overlayfs_reads_our_upper_dir_the_same(tmp_path: Path) -> None:
    tree, _, base = run_one(tmp_path, "fusemount", scenario)
    lowers = [base / "lower" / "l1", base / "lower" / "l2"]
    work = base / "kwork"
    work.mkdir()
    with kernel_overlay(base / "kmnt", lowers, base / "upper", work):
        assert manifest(base / "kmnt") == tree


# -- where the references behave worse --------------------------------------------------------


def hardlink_lowers(base: Path) -> list[Path]:
    lower = base / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "h1").write_bytes(b"one")
    os.link(lower / "h1", lower / "d" / "h2")
    return [lower]


def append_and_stat(mnt: Path) -> tuple[bytes, bool, int]:
    with open(mnt / "h1", "ab") as f:
        f.write(b"+two")
    same = os.stat(mnt / "h1").st_ino == os.stat(mnt / "d" / "h2").st_ino
    return (mnt / "d" / "h2").read_bytes(), same, os.stat(mnt / "h1").st_nlink


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_hardlinked_lower_file_after_copy_up(tmp_path: Path, impl: str) -> None:
    base = tmp_path / impl
    lowers = hardlink_lowers(base)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    upper.mkdir()
    work.mkdir()
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work):
        other, same_inode, nlink = append_and_stat(mnt)
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work):
        after_remount = (mnt / "d" / "h2").read_bytes()
    if impl == "kernel":
        # Split at once: the other name keeps the old data and the old inode.
        assert (other, same_inode, nlink) == (b"one", False, 1)
        assert after_remount == b"one"
    elif impl == "fuse-overlayfs":
        # One inode while mounted, but only one name reaches the upper: split after remount.
        assert (other, same_inode, nlink) == (b"one+two", True, 2)
        assert after_remount == b"one"
    else:
        assert (other, same_inode, nlink) == (b"one+two", True, 2)
        assert after_remount == b"one+two"
        assert (upper / "h1").stat().st_ino == (upper / "d" / "h2").stat().st_ino


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_rename_of_a_lower_directory(tmp_path: Path, impl: str) -> None:
    base = tmp_path / impl
    lowers = build_lowers(base / "lower")
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    upper.mkdir()
    work.mkdir()
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work):
        try:
            os.rename(mnt / "movedir", mnt / "moved")
        except OSError as exc:
            result: object = errno.errorcode[exc.errno or 0]
        else:
            result = sorted(os.listdir(mnt / "moved"))
    if impl == "fusemount":
        assert result == ["from_l1", "inner", "top"]
    else:
        assert result == "EXDEV", f"{impl} renamed a lower directory"
