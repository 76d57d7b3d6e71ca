"""apply_layer: round trips, whiteout modes and orders, type changes, sparse files, caps."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from archive_helpers import (
    copy_tree,
    directory,
    hardlink,
    make_tar,
    manifest,
    names,
    node,
    reg,
    symlink,
)

from graphdrivers.archive import (
    ApplyOptions,
    apply_layer,
    changes_dirs,
    changes_size,
    export_changes,
    export_tree,
)
from graphdrivers.errors import InvalidArchive, NotSupported

CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def apply_bytes(root: Path, data: bytes, **options: object) -> int:
    return apply_layer(root, io.BytesIO(data), ApplyOptions(**options))  # type: ignore[arg-type]


def build_base(root: Path) -> None:
    """A tree with one of everything a layer can hold."""
    (root / "etc" / "conf.d").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "conf.d" / "a.conf").write_text("a=1\n")
    (root / "etc" / "conf.d" / "b.conf").write_text("b=1\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "ping").write_bytes(b"\x7fELF ping")
    os.setxattr(root / "usr" / "bin" / "ping", "security.capability", CAP_NET_RAW)
    (root / "usr" / "bin" / "su").write_bytes(b"\x7fELF su")
    os.chown(root / "usr" / "bin" / "su", 0, 42)
    os.chmod(root / "usr" / "bin" / "su", 0o4750)
    os.symlink("usr/bin", root / "bin")
    (root / "var" / "lib" / "apt" / "lists").mkdir(parents=True)
    for i in range(5):
        (root / "var" / "lib" / "apt" / "lists" / f"list{i}").write_bytes(os.urandom(3000))
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "olddir" / "inner").mkdir(parents=True)
    (root / "olddir" / "inner" / "f").write_text("old")
    (root / "file-becomes-dir").write_text("f")
    (root / "dir-becomes-file").mkdir()
    (root / "dir-becomes-file" / "x").write_text("x")
    (root / "shared").write_text("shared by two names")
    os.link(root / "shared", root / "shared-2")


def change_upper(root: Path) -> None:
    """Every kind of change a layer can make to the base."""
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/:/\n")
    os.unlink(root / "etc" / "conf.d" / "b.conf")
    (root / "etc" / "conf.d" / "c.conf").write_text("c=1\n")
    os.chmod(root / "etc" / "conf.d" / "a.conf", 0o600)
    os.chown(root / "usr" / "bin" / "ping", 0, 7)
    os.setxattr(root / "usr" / "bin" / "ping", "security.capability", CAP_NET_RAW)
    shutil.rmtree(root / "var" / "lib" / "apt" / "lists")
    shutil.rmtree(root / "olddir")
    (root / "olddir").mkdir()
    (root / "olddir" / "new").write_text("new")
    os.unlink(root / "file-becomes-dir")
    (root / "file-becomes-dir" / "child").mkdir(parents=True)
    shutil.rmtree(root / "dir-becomes-file")
    (root / "dir-becomes-file").write_text("now a file")

    app = root / "opt" / "app"
    app.mkdir(parents=True)
    (app / "run").write_bytes(b"#!/bin/sh\n")
    os.chown(app / "run", 1000, 1000)
    os.chmod(app / "run", 0o6755)  # setuid+setgid after chown
    os.link(app / "run", app / "run-again")
    os.link(app / "run", root / "usr" / "bin" / "run")
    (app / "data.bin").write_bytes(os.urandom(200_000))
    os.setxattr(app / "data.bin", "user.origin", b"layer two")
    os.setxattr(app / "data.bin", "trusted.secret", b"\x00\x01")
    with open(app / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"tail")
    (app / "empty").write_bytes(b"")
    os.symlink("/opt/app/run", app / "abs-link")
    os.symlink("../nowhere", app / "dangling")
    os.mkfifo(app / "fifo")
    os.mknod(app / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.chown(app / "zero", 3_000_000, 3_000_001)
    (app / ("x" * 200)).write_text("long component")
    deep = app / "/".join(["deep" + str(i) for i in range(30)])
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep")
    (app / "ünï").write_text("unicode")
    os.utime(app / "ünï", ns=(0, 1_234_567_890_987_654_321))
    os.utime(app / "fifo", ns=(0, 1_111_111_111_000_000_000))
    os.utime(app / "abs-link", ns=(0, 1_222_222_222_500_000_000), follow_symlinks=False)
    os.chmod(root / "tmp", 0o1770)
    os.setxattr(root / "etc", "user.dir", b"on a dir")


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    base.mkdir()
    build_base(base)
    upper = tmp_path / "upper"
    copy_tree(base, upper)
    change_upper(upper)
    return base, upper


def roundtrip(base: Path, upper: Path, target: Path, wrap=lambda b: b) -> int:  # type: ignore[no-untyped-def]
    copy_tree(base, target)
    changes = changes_dirs(upper, base)
    diff = b"".join(export_changes(upper, changes))
    size = apply_bytes(target, wrap(diff))
    assert size == changes_size(upper, changes)
    return size


def test_roundtrip_manifest(layers: tuple[Path, Path], tmp_path: Path) -> None:
    base, upper = layers
    target = tmp_path / "target"
    size = roundtrip(base, upper, target)
    assert size > 200_000

    want, got = manifest(upper), manifest(target)
    # A hardlink to a name outside the changes is carried as a file (OCI layer rule).
    assert want.pop("usr/bin/run")[:-1] == got.pop("usr/bin/run")[:-1]
    for table in (want, got):
        for path in ("opt/app/run", "opt/app/run-again"):
            table[path] = (*table[path][:-1], "run-group")
    assert got == want
    assert changes_dirs(target, upper) == []

    run = os.lstat(target / "opt" / "app" / "run")
    assert stat.S_IMODE(run.st_mode) == 0o6755 and (run.st_uid, run.st_gid) == (1000, 1000)
    assert run.st_ino == os.lstat(target / "opt" / "app" / "run-again").st_ino
    sparse = os.lstat(target / "opt" / "app" / "sparse")
    assert sparse.st_size == (8 << 20) + 4 and sparse.st_blocks * 512 < 256 << 10
    assert os.getxattr(target / "usr" / "bin" / "ping", "security.capability") == CAP_NET_RAW


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_roundtrip_compressed(layers: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    base, upper = layers
    target = tmp_path / "target"
    compress = gzip.compress if kind == "gzip" else zstandard.ZstdCompressor().compress
    roundtrip(base, upper, target, wrap=compress)
    assert changes_dirs(target, upper) == []


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path) -> None:
    data = make_tar([reg("a", b"A" * 5000), reg("b", b"B" * 7000)])
    half = len(data) // 2
    for packed in (
        gzip.compress(data[:half]) + gzip.compress(data[half:]),
        zstandard.ZstdCompressor().compress(data[:half])
        + zstandard.ZstdCompressor().compress(data[half:]),
    ):
        root = tmp_path / str(len(packed))
        root.mkdir()
        assert apply_bytes(root, packed) == 12000
        assert (root / "b").read_bytes() == b"B" * 7000


def test_full_tree_export_apply(layers: tuple[Path, Path], tmp_path: Path) -> None:
    _, upper = layers
    target = tmp_path / "fresh"
    target.mkdir()
    apply_layer(target, io.BytesIO(b"".join(export_tree(upper))))
    assert manifest(target) == manifest(upper)


def test_apply_gnu_tar_output(layers: tuple[Path, Path], tmp_path: Path) -> None:
    """A layer written by GNU tar (independent producer) applies to the same tree."""
    _, upper = layers
    data = subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--format=posix",
            "-cf",
            "-",
            "-C",
            upper,
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout
    target = tmp_path / "from-gnu"
    target.mkdir()
    apply_bytes(target, data)
    assert manifest(target, dir_times=False) == manifest(upper, dir_times=False)


# ------------------------------------------------------------------ whiteouts, "delete" mode


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    (root / "d").mkdir(parents=True)
    for name in ("a", "b", "old1", "old2"):
        (root / "d" / name).write_text(name)
    (root / "foo" / "sub").mkdir(parents=True)
    (root / "foo" / "bar").write_text("bar")
    (root / "foo" / "sub" / "deep").write_text("deep")
    return root


@pytest.mark.parametrize("order", ["marker-first", "marker-last", "marker-middle"])
def test_opaque_in_any_order(lower: Path, order: str) -> None:
    entries = [directory("d/"), reg("d/new", b"new"), reg("d/a", b"a again")]
    marker = reg("d/.wh..wh..opq")
    position = {"marker-first": 0, "marker-last": len(entries), "marker-middle": 2}[order]
    entries.insert(position, marker)
    apply_bytes(lower, make_tar(entries))
    assert names(lower / "d") == ["a", "new"]
    assert (lower / "d" / "a").read_text() == "a again"


@pytest.mark.parametrize("first", [True, False])
def test_whiteout_before_or_after_siblings(lower: Path, first: bool) -> None:
    wh, sibling = reg("d/.wh.a"), reg("d/c", b"c")
    apply_bytes(lower, make_tar([wh, sibling] if first else [sibling, wh]))
    assert names(lower / "d") == ["b", "c", "old1", "old2"]


@pytest.mark.parametrize("reverse", [False, True])
def test_whiteout_of_dir_and_of_a_name_inside_it(lower: Path, reverse: bool) -> None:
    entries = [reg(".wh.foo"), reg("foo/.wh.bar")]
    apply_bytes(lower, make_tar(entries[::-1] if reverse else entries))
    assert not (lower / "foo").exists()
    assert names(lower) == ["d", "d/a", "d/b", "d/old1", "d/old2"]


def test_whiteout_of_missing_name_is_a_noop(lower: Path) -> None:
    before = manifest(lower)
    apply_bytes(lower, make_tar([reg("d/.wh.nothing"), reg("nodir/.wh.x"), reg("d/a/.wh.x")]))
    assert manifest(lower) == before


def test_whiteout_never_hides_own_layer_entries(lower: Path) -> None:
    data = make_tar(
        [
            reg("d/a", b"mine"),
            reg("d/.wh.a"),
            directory("foo/"),
            reg("foo/mine", b"mine"),
            reg("foo/sub/also-mine", b"mine"),
            reg(".wh.foo"),
        ]
    )
    apply_bytes(lower, data)
    assert (lower / "d" / "a").read_text() == "mine"
    assert names(lower / "foo") == ["mine", "sub", "sub/also-mine"]


def test_whiteout_of_symlink_removes_the_link_not_its_target(lower: Path) -> None:
    os.symlink("d", lower / "link")
    apply_bytes(lower, make_tar([reg(".wh.link")]))
    assert not os.path.lexists(lower / "link")
    assert names(lower / "d") == ["a", "b", "old1", "old2"]


# ------------------------------------------------------------------ "overlay" and "aufs"


def test_overlay_mode_whiteouts_and_opaque(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    data = make_tar(
        [
            reg(".wh.gone"),
            directory("d/"),
            reg("d/.wh..wh..opq"),
            reg("d/kept", b"k"),
            reg("e/.wh.x"),
            reg(".wh.recreated"),
            directory("recreated/"),
            reg("mine", b"m"),
            reg(".wh.mine"),
        ]
    )
    apply_bytes(upper, data, whiteouts="overlay")
    wh = os.lstat(upper / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert names(upper / "d") == ["kept"]
    assert stat.S_ISCHR(os.lstat(upper / "e" / "x").st_mode)
    assert os.getxattr(upper / "recreated", "trusted.overlay.opaque") == b"y"
    assert (upper / "mine").read_text() == "m"


def test_overlay_mode_userxattr(tmp_path: Path) -> None:
    apply_bytes(
        tmp_path,
        make_tar([directory("d/"), reg("d/.wh..wh..opq")]),
        whiteouts="overlay",
        userxattr=True,
    )
    assert os.getxattr(tmp_path / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "d")


def test_aufs_mode_keeps_whiteout_files(tmp_path: Path) -> None:
    apply_bytes(
        tmp_path,
        make_tar([reg(".wh.gone"), directory("d/"), reg("d/.wh..wh..opq"), reg(".wh..wh.plnk")]),
        whiteouts="aufs",
    )
    assert names(tmp_path) == [".wh.gone", "d", "d/.wh..wh..opq"]
    assert (tmp_path / ".wh.gone").stat().st_size == 0


# .wh.foo and foo/.wh.bar in one layer, both orders: foo is gone (c/storage's rule)
WHITEOUT_BELOW_WHITEOUT = {
    "forward": [reg(".wh.foo"), reg("foo/.wh.bar")],
    "reverse": [reg("foo/.wh.bar"), reg(".wh.foo")],
}


@pytest.mark.parametrize("order", sorted(WHITEOUT_BELOW_WHITEOUT))
def test_whiteout_below_own_whiteout(tmp_path: Path, order: str) -> None:
    """Each mode leaves exactly a whiteout of foo, whatever the order of the two markers."""
    data = make_tar(WHITEOUT_BELOW_WHITEOUT[order])
    for mode in ("delete", "overlay", "aufs"):
        root = tmp_path / mode
        (root / "foo").mkdir(parents=True)
        (root / "foo" / "bar").write_text("lower")
        apply_bytes(root, data, whiteouts=mode)
        found = names(root)
        if mode == "delete":
            assert found == [], found
        elif mode == "overlay":
            assert found == ["foo"], found
            st = os.lstat(root / "foo")
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        else:
            assert found == [".wh.foo"], found


# A layer that turns a directory into a file or a symlink and whites out a name below it (as
# umoci writes debian-minbase's /usr/share/zoneinfo): the marker hides nothing more.
NOT_A_DIR_ANY_MORE = {
    "file-first": [reg("z", b"now a file"), reg("z/.wh.a"), symlink("s", "z"), reg("s/.wh.b")],
    "marker-first": [reg("z/.wh.a"), reg("z", b"now a file"), reg("s/.wh.b"), symlink("s", "z")],
}


@pytest.mark.parametrize("order", sorted(NOT_A_DIR_ANY_MORE))
@pytest.mark.parametrize("mode", ["delete", "overlay", "aufs"])
def test_whiteout_below_a_name_this_layer_made_a_file(
    tmp_path: Path, order: str, mode: str
) -> None:
    """Every mode keeps the layer's own file and symlink and nothing below them."""
    root = tmp_path / "root"
    root.mkdir()
    if mode == "delete":  # the tree of the layer below, changed in place
        for d in ("z", "s"):
            (root / d).mkdir()
            (root / d / "a").write_text("lower")
            (root / d / "b").write_text("lower")
    outside = tmp_path / "victim"
    outside.write_text("untouched")

    apply_bytes(root, make_tar(NOT_A_DIR_ANY_MORE[order]), whiteouts=mode)

    assert names(root) == ["s", "z"]
    assert (root / "z").read_bytes() == b"now a file"
    assert os.readlink(root / "s") == "z"
    assert outside.read_text() == "untouched"


def test_union_xattrs_in_a_tar_are_not_applied(tmp_path: Path) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.user.ok": "yes",
    }
    apply_bytes(tmp_path, make_tar([(info, data)]))
    assert os.listxattr(tmp_path / "f") == ["user.ok"]


# ------------------------------------------------------------------ replacing entries


def test_type_changes_and_merges(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir2file" / "deep").mkdir(parents=True)
    (root / "dir2file" / "deep" / "f").write_text("f")
    (root / "file2dir").write_text("f")
    (root / "merge").mkdir()
    (root / "merge" / "keep").write_text("keep")
    os.chmod(root / "merge", 0o700)
    (root / "dir2link").mkdir()
    os.symlink("merge", root / "link2dir")

    apply_bytes(
        root,
        make_tar(
            [
                reg("dir2file", b"file now"),
                directory("file2dir/", 0o750),
                reg("file2dir/child", b"c"),
                directory("merge/", 0o755, uid=12, gid=34),
                symlink("dir2link", "merge"),
                directory("link2dir/", 0o711),
            ]
        ),
    )
    assert (root / "dir2file").read_text() == "file now"
    assert stat.S_IMODE(os.lstat(root / "file2dir").st_mode) == 0o750
    merged = os.lstat(root / "merge")
    assert (stat.S_IMODE(merged.st_mode), merged.st_uid, merged.st_gid) == (0o755, 12, 34)
    assert (root / "merge" / "keep").read_text() == "keep"
    assert os.readlink(root / "dir2link") == "merge"
    assert stat.S_ISDIR(os.lstat(root / "link2dir").st_mode)
    assert stat.S_IMODE(os.lstat(root / "link2dir").st_mode) == 0o711


def test_duplicate_entries_last_wins_and_counts_once(tmp_path: Path) -> None:
    size = apply_bytes(tmp_path, make_tar([reg("f", b"first!"), reg("f", b"second")]))
    assert (tmp_path / "f").read_bytes() == b"second"
    assert size == 6


def test_hardlink_size_counted_once(tmp_path: Path) -> None:
    size = apply_bytes(
        tmp_path, make_tar([reg("f", b"12345"), hardlink("g", "f"), hardlink("h", "/g")])
    )
    assert size == 5
    assert os.stat(tmp_path / "h").st_nlink == 3


def test_parents_are_implied_0755(tmp_path: Path) -> None:
    apply_bytes(tmp_path, make_tar([reg("a/b/c", b"c")]))
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o755


def test_directory_times_are_set_after_their_entries(tmp_path: Path) -> None:
    info, _ = directory("d/")
    info.pax_headers = {"mtime": "1500000000.25"}
    apply_bytes(tmp_path, make_tar([(info, None), reg("d/f", b"f"), reg("d/g", b"g")]))
    assert os.stat(tmp_path / "d").st_mtime_ns == 1_500_000_000_250_000_000


def test_sparse_file_stays_sparse(tmp_path: Path) -> None:
    data = b"\x01" * 5000 + bytes(8 << 20) + b"\x02" * 3
    apply_bytes(tmp_path, make_tar([reg("sparse", data)]))
    st = os.stat(tmp_path / "sparse")
    assert st.st_size == len(data)
    assert st.st_blocks * 512 <= 64 << 10
    assert (tmp_path / "sparse").read_bytes() == data


def test_sparse_file_ending_in_a_hole(tmp_path: Path) -> None:
    data = b"x" + bytes(1 << 20)
    apply_bytes(tmp_path, make_tar([reg("tailhole", data)]))
    assert (tmp_path / "tailhole").read_bytes() == data


def test_devices_need_allow_devices(tmp_path: Path) -> None:
    dev = node("null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
    with pytest.raises(InvalidArchive, match="allow_devices"):
        apply_bytes(tmp_path, make_tar([dev]), allow_devices=False)
    assert not os.path.lexists(tmp_path / "null")
    apply_bytes(tmp_path, make_tar([dev]), allow_devices=True)
    assert os.lstat(tmp_path / "null").st_rdev == os.makedev(1, 3)


def test_root_entries_leave_the_root_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    before = os.lstat(tmp_path)
    apply_bytes(
        tmp_path,
        make_tar(
            [
                directory("./", 0o777, uid=99),
                directory("/", 0o700),
                directory(".", 0o700),
                reg("./f", b"f"),
            ]
        ),
    )
    after = os.lstat(tmp_path)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    assert (tmp_path / "f").read_bytes() == b"f"


def test_symlink_xattrs_and_times_set_without_following(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("t")
    before = os.stat(tmp_path / "target")
    info, _ = symlink("link", "target")
    info.pax_headers = {"SCHILY.xattr.trusted.onlink": "v", "mtime": "1000000000.5"}
    apply_bytes(tmp_path, make_tar([(info, None)]))
    assert os.getxattr(tmp_path / "link", "trusted.onlink", follow_symlinks=False) == b"v"
    assert os.lstat(tmp_path / "link").st_mtime_ns == 1_000_000_000_500_000_000
    assert "trusted.onlink" not in os.listxattr(tmp_path / "target")
    assert os.stat(tmp_path / "target").st_mtime_ns == before.st_mtime_ns


def test_libarchive_xattrs(tmp_path: Path) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"LIBARCHIVE.xattr.user.with%20space": "aGVsbG8="}
    apply_bytes(tmp_path, make_tar([(info, data)]))
    assert os.getxattr(tmp_path / "f", "user.with space") == b"hello"


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real ramfs mount: a filesystem without xattr support."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_xattrs_unsupported_error_or_best_effort(ramfs: Path) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"SCHILY.xattr.user.test": "1"}
    layer = make_tar([(info, data)])
    with pytest.raises(NotSupported, match=r"user\.test"):
        apply_bytes(ramfs, layer)
    (ramfs / "f").unlink()
    assert apply_bytes(ramfs, layer, best_effort_xattrs=True) == 1
    assert (ramfs / "f").read_bytes() == b"x"


# ------------------------------------------------------------------ malformed and capped


def test_truncated_streams_are_invalid(tmp_path: Path) -> None:
    data = make_tar([reg("a", b"A" * 3000), reg("b", b"B" * 3000)])
    for cut in (100, 700, 2000, 3584, 4096, 7168):  # 3584, 7168: right after a member
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        with pytest.raises(InvalidArchive):
            apply_bytes(root, data[:cut])
    with pytest.raises(InvalidArchive):
        apply_bytes(tmp_path, b"")
    with pytest.raises(InvalidArchive):
        apply_bytes(tmp_path, gzip.compress(data)[:-20])


def test_corrupt_headers_and_compression(tmp_path: Path) -> None:
    data = bytearray(make_tar([reg("a", b"A")]))
    data[10] ^= 0xFF
    with pytest.raises(InvalidArchive, match="checksum"):
        apply_bytes(tmp_path, bytes(data))
    with pytest.raises(InvalidArchive, match="gzip"):
        apply_bytes(tmp_path, b"\x1f\x8b\x08\x00" + b"garbage" * 100)
    with pytest.raises(InvalidArchive, match="zstd"):
        apply_bytes(tmp_path, b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    with pytest.raises(InvalidArchive, match="xz"):
        apply_bytes(tmp_path, lzma.compress(bytes(make_tar([reg("a", b"A")]))))
    with pytest.raises(InvalidArchive):
        apply_bytes(tmp_path, b"this is not a tar file at all" * 40)


def test_unsupported_member_types(tmp_path: Path) -> None:
    info, _ = node("vol", b"V")
    with pytest.raises(InvalidArchive, match="unsupported"):
        apply_bytes(tmp_path, make_tar([(info, None)], fmt=tarfile.GNU_FORMAT))


def test_decompression_bomb_hits_max_bytes(tmp_path: Path) -> None:
    bomb = gzip.compress(make_tar([reg("zeros", bytes(64 << 20))]), compresslevel=9)
    assert len(bomb) < 200_000
    with pytest.raises(InvalidArchive, match="max_bytes"):
        apply_bytes(tmp_path, bomb, max_bytes=8 << 20)


def test_max_entries(tmp_path: Path) -> None:
    data = make_tar([reg(f"f{i}", b"") for i in range(20)])
    with pytest.raises(InvalidArchive, match="max_entries"):
        apply_bytes(tmp_path, data, max_entries=10)
    ok = tmp_path / "ok"
    ok.mkdir()
    apply_bytes(ok, data, max_entries=20)
    assert len(names(ok)) == 20


def test_long_names_hit_max_name_bytes(tmp_path: Path) -> None:
    long_name = "/".join(["d" * 200] * 30)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with pytest.raises(InvalidArchive, match=r"max_name_bytes|cap"):
            apply_bytes(tmp_path, make_tar([reg(long_name, b"x")], fmt=fmt))
    assert names(tmp_path) == []


def test_huge_pax_header_hits_max_pax_bytes(tmp_path: Path) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"comment": "c" * (2 << 20)}
    with pytest.raises(InvalidArchive, match="PAX header"):
        apply_bytes(tmp_path, make_tar([(info, data)]))
    assert names(tmp_path) == []


def test_gnu_sparse_members_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"x")
    data = subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", "-", "-C", src, "holes"],
        check=True,
        capture_output=True,
    ).stdout
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(InvalidArchive, match="sparse"):
        apply_bytes(dst, data)


def test_write_sparse_any_split_keeps_content_and_makes_holes(tmp_path: Path) -> None:
    import random

    from graphdrivers.archive.apply import write_sparse

    rng = random.Random(5)
    for trial in range(20):
        blocks = [bytes(4096) if rng.random() < 0.5 else rng.randbytes(4096) for _ in range(64)]
        data = b"".join(blocks) + rng.randbytes(rng.randrange(4096)) + bytes(rng.randrange(9000))
        cuts = sorted(rng.sample(range(1, len(data)), 10))
        spans = [(data, a, b) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        path = tmp_path / f"f{trial}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            write_sparse(fd, spans, len(data))
        finally:
            os.close(fd)
        assert path.read_bytes() == data
        # Every aligned 4 KiB block of zeros that no split cut through is a hole.
        data_bytes = sum(1 for b in blocks if any(b)) * 4096
        assert os.stat(path).st_blocks * 512 <= data_bytes + 12 * 4096 + 16384
