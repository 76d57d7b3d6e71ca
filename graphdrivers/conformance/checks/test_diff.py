"""diff, apply_diff and diff_size: a layer's diff applied elsewhere rebuilds the same tree.

Trees are compared by manifest with mtimes cut to whole seconds: what the layer tar format keeps
for certain. Sockets are left out (tar has no socket entry) and device nodes get a check of their
own, since a driver may refuse to create them from a tar.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance import corpus
from graphdrivers.conformance.helpers import (
    apply_bytes,
    make_layer,
    mkdir,
    populated,
    read_diff,
    tree,
    write,
)
from graphdrivers.conformance.manifest import Manifest, assert_same_tree, strip_mtimes
from graphdrivers.conformance.tars import TarBuilder, tar_members, tar_names
from graphdrivers.errors import InvalidArchive
from graphdrivers.whiteout import WHITEOUT_PREFIX

# moby DiffApply's file count; each file is 64 bytes.
DIFF_APPLY_FILES = 50

# Parts whose every attribute a layer tar carries.
TAR_PARTS = sorted(set(corpus.PARTS) - {"socket", "devices"})


def seconds(m: Manifest) -> Manifest:
    return strip_mtimes(m, to_seconds=True)


def applied_tree(driver: Any, layer_id: str) -> Manifest:
    return seconds(tree(driver, layer_id, mtimes=True))


def test_diff_apply_round_trip(driver: Any) -> None:
    """moby DiffApply: overwritten files, a deleted file and a deleted dir survive a round trip."""
    rng = random.Random(20240611)

    def base(root: Path) -> None:
        for i in range(DIFF_APPLY_FILES):
            write(root, f"file-{i}", rng.randbytes(64))
        write(root, "file-remove.txt", b"to be removed")
        write(root, "var/lib/state", b"below a removed dir")

    def upper(root: Path) -> None:
        for i in range(DIFF_APPLY_FILES):
            write(root, f"file-{i}", rng.randbytes(64))
        os.unlink(root / "file-remove.txt")
        shutil.rmtree(root / "var/lib")

    make_layer(driver, "base", None, base)
    expected = populated(driver, "upper", upper, "base", mtimes=True)
    size = apply_bytes(driver, "diff", "base", read_diff(driver, "upper", "base"))

    got = applied_tree(driver, "diff")
    assert "/file-remove.txt" not in got, "a deleted file came back"
    assert "/var/lib" not in got and "/var/lib/state" not in got, "a deleted dir came back"
    assert_same_tree(seconds(expected), got, "diff(upper, base) applied onto base")
    assert size == DIFF_APPLY_FILES * 64, f"apply_diff returned {size}"
    assert driver.diff_size("diff", "base") == size
    assert driver.diff_size("upper", "base") == size


@pytest.mark.parametrize("part", TAR_PARTS)
def test_diff_apply_keeps(driver: Any, caps: Any, part: str) -> None:
    """diff(base) applied as a new root layer gives back every entry and attribute."""
    expected = populated(driver, "base", lambda r: corpus.PARTS[part](r, caps), mtimes=True)
    apply_bytes(driver, "copy", None, read_diff(driver, "base"))
    assert_same_tree(seconds(expected), applied_tree(driver, "copy"), f"{part} after diff/apply")


def _lower(root: Path) -> None:
    write(root, "content", b"old content")
    write(root, "chmod-only", b"same", mode=0o644)
    write(root, "chown-only", b"same")
    write(root, "renamed", b"moves away")
    write(root, "rename-over", b"overwritten by a rename")
    write(root, "survivor", b"replaced by a rename")
    write(root, "dir/a", b"a")
    write(root, "dir/sub/b", b"b")
    write(root, "opaque/old", b"hidden once the dir is recreated")
    write(root, "file-becomes-dir", b"x")
    write(root, "dir-becomes-file/inner", b"x")
    write(root, "shared/original", b"linked from the upper layer")
    os.symlink("content", root / "retarget")
    os.setxattr(root / "content", "user.kept", b"1")


def _upper(root: Path) -> None:
    write(root, "content", b"new content, longer than before")
    os.chmod(root / "chmod-only", 0o600)
    os.chown(root / "chown-only", 1234, 5678)
    os.rename(root / "renamed", root / "moved-here")
    os.rename(root / "rename-over", root / "survivor")
    shutil.rmtree(root / "dir")
    shutil.rmtree(root / "opaque")
    write(root, "opaque/new", b"only this")
    os.unlink(root / "file-becomes-dir")
    write(root, "file-becomes-dir/inside", b"y")
    shutil.rmtree(root / "dir-becomes-file")
    write(root, "dir-becomes-file", b"now a file")
    os.link(root / "shared/original", root / "shared/link")
    os.unlink(root / "retarget")
    os.symlink("chmod-only", root / "retarget")
    os.setxattr(root / "content", "user.added", b"2")


def test_diff_apply_changed_tree(driver: Any) -> None:
    """Renames, type changes, metadata-only changes and a recreated dir survive diff/apply."""
    try:
        make_layer(driver, "base", None, _lower)
    except OSError as exc:
        pytest.skip(f"user xattrs on the backing filesystem ({exc})")
    expected = populated(driver, "upper", _upper, "base", mtimes=True)

    apply_bytes(driver, "copy", "base", read_diff(driver, "upper", "base"))
    got = applied_tree(driver, "copy")
    assert "/opaque/old" not in got, "a file of a deleted and recreated dir came back"

    # OCI: a hardlink whose peer is outside the changeset is not recorded as a link. A naive
    # diff leaves the unchanged lower name out, so the applied layer holds two files with the
    # same content; a union's diff carries the copied-up lower name too, and keeps the link.
    if got["/shared/link"].hardlink_group is None:
        for path in ("/shared/original", "/shared/link"):
            expected[path] = dataclasses.replace(expected[path], hardlink_group=None)
    assert_same_tree(seconds(expected), got, "diff(upper, base) applied onto base")


def test_diff_is_reproducible(driver: Any, caps: Any) -> None:
    """The diff of an unchanged layer is the same bytes every time."""
    if not caps.reproducible_diff:
        pytest.skip("driver does not claim reproducible diffs")
    make_layer(driver, "base", None, lambda r: corpus.regular(r, caps))
    make_layer(driver, "upper", "base", _small_change)
    for layer, parent in (("base", None), ("upper", "base"), ("upper", None)):
        first, second = read_diff(driver, layer, parent), read_diff(driver, layer, parent)
        assert first == second, f"diff({layer}, {parent}) changed between two reads"


def _small_change(root: Path) -> None:
    write(root, "etc/hosts", b"changed\n")
    os.unlink(root / "empty")
    write(root, "new/file", b"added")


def test_diff_without_parent_is_full_tree(driver: Any, caps: Any) -> None:
    """diff(id) holds every entry of the layer and no whiteouts."""
    make_layer(driver, "base", None, lambda r: corpus.regular(r, caps))
    expected = populated(driver, "upper", _small_change, "base", mtimes=True)
    data = read_diff(driver, "upper")
    whiteouts = [n for n in tar_names(data) if Path(n).name.startswith(WHITEOUT_PREFIX)]
    assert whiteouts == [], f"a full diff holds whiteouts: {whiteouts}"

    apply_bytes(driver, "copy", None, data)
    assert_same_tree(seconds(expected), applied_tree(driver, "copy"), "diff(upper) applied")


def test_diff_entries(driver: Any) -> None:
    """A diff has relative names, no duplicates, whiteouts for deletions, one body per inode."""

    def base(root: Path) -> None:
        write(root, "gone", b"x")
        write(root, "dir/inner", b"x")
        write(root, "kept", b"x")

    def upper(root: Path) -> None:
        os.unlink(root / "gone")
        shutil.rmtree(root / "dir")
        write(root, "new/a", b"linked")
        os.link(root / "new/a", root / "new/b")

    make_layer(driver, "base", None, base)
    make_layer(driver, "upper", "base", upper)
    members = tar_members(read_diff(driver, "upper", "base"))
    names = [m.name.rstrip("/") for m in members]

    assert len(names) == len(set(names)), f"duplicate entries: {names}"
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/"), f"bad name {name!r}"
    assert ".wh.gone" in names and ".wh.dir" in names, f"whiteouts missing: {names}"
    assert "kept" not in names and "dir/inner" not in names, f"unchanged entries: {names}"

    by_name = {m.name.rstrip("/"): m for m in members}
    kinds = sorted((by_name["new/a"].type, by_name["new/b"].type))
    assert kinds == sorted([tarfile.REGTYPE, tarfile.LNKTYPE]), f"link entry types {kinds}"
    link = by_name["new/b"] if by_name["new/b"].islnk() else by_name["new/a"]
    body = by_name["new/a"] if link is by_name["new/b"] else by_name["new/b"]
    assert link.linkname.rstrip("/") == body.name, f"hardlink to {link.linkname!r}"


def test_diff_size_counts_hardlinks_once(driver: Any) -> None:
    """diff_size adds the sizes of added and changed files, each inode once."""

    def upper(root: Path) -> None:
        write(root, "big", b"b" * 1000)
        os.link(root / "big", root / "big-again")
        write(root, "small", b"s" * 10)
        mkdir(root, "a-dir")

    make_layer(driver, "base", None, lambda r: write(r, "old", b"o" * 5000))
    make_layer(driver, "upper", "base", upper)
    assert driver.diff_size("upper", "base") == 1010
    size = apply_bytes(driver, "copy", "base", read_diff(driver, "upper", "base"))
    assert size == 1010, f"apply_diff returned {size}"
    assert driver.diff_size("base") == 5000


def _whiteout_base(root: Path) -> None:
    write(root, "keep", b"k")
    write(root, "gone", b"g")
    write(root, "dir/a", b"a")
    write(root, "dir/b", b"b")
    write(root, "opq/x", b"x")
    write(root, "opq/sub/y", b"y")


def test_apply_whiteouts(driver: Any) -> None:
    """.wh. names delete lower entries, an opaque marker (after its siblings) empties the dir."""
    make_layer(driver, "base", None, _whiteout_base)
    data = (
        TarBuilder()
        .file(".wh.gone")
        .file("dir/.wh.a")
        .file("opq/new", b"n")
        .file("opq/.wh..wh..opq")
        .file(".wh.missing")
        .to_bytes()
    )
    try:
        apply_bytes(driver, "upper", "base", data)
    except InvalidArchive as exc:
        raise AssertionError(f"a valid layer with whiteouts was refused: {exc}") from exc

    got = {p for p, e in tree(driver, "upper").items() if e.type != "dir"}
    assert got == {"/keep", "/dir/b", "/opq/new"}, f"files after whiteouts: {sorted(got)}"
    assert sorted(p for p in tree(driver, "upper") if Path(p).name.startswith(".wh.")) == []


def test_apply_whiteout_then_whiteout_below(driver: Any) -> None:
    """A layer with both /.wh.foo and /foo/.wh.bar applies: foo is gone (c/storage's rule)."""
    make_layer(driver, "base", None, lambda r: write(r, "foo/bar", b"z"))
    data = TarBuilder().file(".wh.foo").file("foo/.wh.bar").to_bytes()
    try:
        apply_bytes(driver, "upper", "base", data)
    except InvalidArchive as exc:
        raise AssertionError(f"a layer with .wh.foo and foo/.wh.bar was refused: {exc}") from exc
    assert sorted(tree(driver, "upper")) == ["/"]


def test_whiteout_spares_own_layer(driver: Any) -> None:
    """A whiteout hides lower entries only, not a file of its own layer."""
    driver.create("base")
    data = TarBuilder().file("own", b"mine").file(".wh.own").to_bytes()
    apply_bytes(driver, "upper", "base", data)
    with driver.mounted("upper") as root:
        assert (Path(root) / "own").read_bytes() == b"mine", "own-layer file was whited out"


def test_diff_carries_devices(driver: Any, caps: Any) -> None:
    """Device nodes appear in the diff with their numbers; apply recreates or refuses them."""
    expected = populated(driver, "base", lambda r: corpus.devices(r, caps), mtimes=True)
    data = read_diff(driver, "base")
    found = {
        m.name.rstrip("/"): (m.type, m.devmajor, m.devminor)
        for m in tar_members(data)
        if m.ischr() or m.isblk()
    }
    assert found == {"dev/null": (tarfile.CHRTYPE, 1, 3), "dev/loop9": (tarfile.BLKTYPE, 7, 9)}

    try:
        apply_bytes(driver, "copy", None, data)
    except InvalidArchive:
        assert not driver.exists("copy"), "a refused apply left its layer behind"
        return
    assert_same_tree(seconds(expected), applied_tree(driver, "copy"), "devices after diff/apply")


def _bad_streams() -> dict[str, bytes]:
    body = TarBuilder().file("big", random.Random(7).randbytes(100_000)).to_bytes()
    return {
        "truncated": body[: len(body) // 2],
        "truncated-header": body[:300],
        "garbage": random.Random(8).randbytes(4096),
        "truncated-gzip": gzip.compress(body)[:2000],
        "bad-checksum": body[:148] + b"99999999" + body[156:],
    }


@pytest.mark.parametrize("kind", sorted(_bad_streams()))
def test_apply_corrupt_archive(driver: Any, kind: str) -> None:
    """A corrupt or truncated stream raises InvalidArchive and leaves no layer."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"base"))
    before = tree(driver, "base")
    with pytest.raises(InvalidArchive):
        apply_bytes(driver, "broken", "base", _bad_streams()[kind])
    assert not driver.exists("broken"), "a failed apply left its layer"
    assert "broken" not in driver.list_layers()
    assert_same_tree(before, tree(driver, "base"), "parent after a failed apply")
    driver.create("broken", "base")  # the id is free again


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_apply_compressed(driver: Any, compression: str) -> None:
    """apply_diff takes gzip and zstd streams and unpacks them like the plain tar."""
    expected = populated(driver, "base", lambda r: write(r, "dir/f", b"packed" * 100), mtimes=True)
    data = read_diff(driver, "base")
    if compression == "gzip":
        packed = gzip.compress(data)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor().compress(data)
    apply_bytes(driver, "copy", None, packed)
    assert_same_tree(seconds(expected), applied_tree(driver, "copy"), f"{compression} apply")


def test_apply_into_parent_layer_refused(driver: Any) -> None:
    """apply_diff into a layer that has children is refused and changes nothing."""
    from graphdrivers.errors import DriverError

    make_layer(driver, "base", None, lambda r: write(r, "f", b"base"))
    driver.create("child", "base")
    before = tree(driver, "base")
    with pytest.raises(DriverError):
        apply_bytes(driver, "base", None, TarBuilder().file("g", b"x").to_bytes())
    assert_same_tree(before, tree(driver, "base"), "a parent after a refused apply")
