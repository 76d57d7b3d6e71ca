"""In-process tests of the union's Operations: handlers awaited under pytest-trio, no mount.

Every test builds its layer dirs in tmp_path, drives the handlers like the kernel would, and
checks the upper dir's invariants at the end (empty work dir, whiteouts in one format, upper
attributes equal to the merged view)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest
from fusemount_helpers import CTX, Harness, check_upper, fields

from fusemount.inodes import ORIGIN_SHIFT, ORIGIN_XATTR, decode_origin
from fusemount.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE
from graphdrivers import whiteout as wh

FORMATS = [wh.WhiteoutFormat.OVERLAY, wh.WhiteoutFormat.AUFS]


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    """Two lowers (l1 over l2), an empty upper and work dir."""
    dirs = {name: tmp_path / name for name in ("l1", "l2", "upper", "work")}
    for path in dirs.values():
        path.mkdir()
    l1, l2 = dirs["l1"], dirs["l2"]
    (l2 / "a").write_bytes(b"bottom")
    (l1 / "a").write_bytes(b"top")
    (l2 / "only2").write_bytes(b"2")
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "sub" / "f").write_bytes(b"deep")
    (l2 / "d" / "x").write_bytes(b"x")
    (l1 / "d").mkdir()
    (l1 / "d" / "y").write_bytes(b"y")
    return dirs


@pytest.fixture(params=FORMATS, ids=lambda f: str(f))
async def h(request: pytest.FixtureRequest, layers: dict[str, Path]) -> AsyncIterator[Harness]:
    harness = Harness([layers["l1"], layers["l2"]], layers["upper"], layers["work"], request.param)
    yield harness
    await check_upper(harness)
    harness.close()


def whiteout_present(upper: Path, rel: str, fmt: wh.WhiteoutFormat) -> bool:
    path = upper / rel
    if fmt is wh.WhiteoutFormat.AUFS:
        return (path.parent / (".wh." + path.name)).is_file()
    return path.exists() and wh.is_overlay_whiteout(path.lstat())


# -- reading through layers -------------------------------------------------------------------


@pytest.mark.trio
async def test_lookup_takes_the_topmost_layer(h: Harness, layers: dict[str, Path]) -> None:
    assert await h.read("a") == b"top"
    assert await h.read("only2") == b"2"
    attr = await h.lookup("a")
    st = (layers["l1"] / "a").stat()
    assert (attr.st_size, attr.st_mode, attr.st_mtime_ns) == (3, st.st_mode, st.st_mtime_ns)
    assert sorted(await h.listdir("d")) == ["sub", "x", "y"]


@pytest.mark.trio
async def test_missing_name_is_a_cached_negative_entry(h: Harness) -> None:
    attr = await h.ops.lookup(pyfuse3.ROOT_INODE, b"nope", CTX)
    assert attr.st_ino == 0 and attr.entry_timeout > 0


@pytest.mark.trio
@pytest.mark.parametrize("lower_fmt", FORMATS, ids=str)
async def test_both_whiteout_formats_are_read(
    h: Harness, layers: dict[str, Path], lower_fmt: wh.WhiteoutFormat
) -> None:
    l1 = layers["l1"]
    if lower_fmt is wh.WhiteoutFormat.OVERLAY:
        os.mknod(l1 / "only2", stat.S_IFCHR, 0)
        os.mknod(l1 / "d" / ".wh..opq", stat.S_IFCHR, 0)  # what fuse-overlayfs leaves behind
        os.setxattr(l1 / "d", wh.OVERLAY_OPAQUE_XATTR, b"y")
    else:
        (l1 / ".wh.only2").touch()
        (l1 / "d" / ".wh..wh..opq").touch()
        (l1 / ".wh..wh.plnk").mkdir()
    names = await h.listdir("")
    assert sorted(names) == ["a", "d"]
    assert sorted(await h.listdir("d")) == ["y"]
    with pytest.raises(pyfuse3.FUSEError):
        await h.lookup("only2")
    with pytest.raises(pyfuse3.FUSEError):
        await h.lookup("d/x")


@pytest.mark.trio
async def test_aufs_whiteout_does_not_hide_its_own_layer(
    h: Harness, layers: dict[str, Path]
) -> None:
    (layers["l1"] / ".wh.a").touch()
    assert await h.read("a") == b"top"
    (layers["l1"] / ".wh.only2").touch()
    assert "only2" not in await h.listdir("")


@pytest.mark.trio
async def test_readdir_inode_equals_stat_inode(h: Harness) -> None:
    for name, attr in (await h.listdir("")).items():
        assert attr.st_ino == (await h.lookup(name)).st_ino
        assert attr.st_ino > 1


@pytest.mark.trio
async def test_dot_wh_names_cannot_be_created(h: Harness) -> None:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await h.create(".wh.evil")
    assert exc.value.errno == errno.EINVAL


@pytest.mark.trio
async def test_names_over_255_bytes(h: Harness) -> None:
    long = b"n" * 256
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await h.ops.lookup(pyfuse3.ROOT_INODE, long, CTX)
    assert exc.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await h.ops.mkdir(pyfuse3.ROOT_INODE, long, stat.S_IFDIR | 0o755, CTX)
    assert exc.value.errno == errno.ENAMETOOLONG
    await h.create("n" * 255, b"ok")
    assert await h.read("n" * 255) == b"ok"


# -- writing and copy-up ----------------------------------------------------------------------


@pytest.mark.trio
async def test_create_writes_into_the_upper(h: Harness, layers: dict[str, Path]) -> None:
    await h.mkdir("newdir", 0o750)
    await h.create("newdir/f", b"hello", 0o640)
    assert (layers["upper"] / "newdir" / "f").read_bytes() == b"hello"
    assert stat.S_IMODE((layers["upper"] / "newdir").stat().st_mode) == 0o750
    assert stat.S_IMODE((layers["upper"] / "newdir" / "f").stat().st_mode) == 0o640
    assert await h.read("newdir/f") == b"hello"


@pytest.mark.trio
async def test_copy_up_keeps_attributes_holes_and_xattrs(
    h: Harness, layers: dict[str, Path]
) -> None:
    src = layers["l2"] / "sparse"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"tail")
    os.chown(src, 1234, 5678)
    os.chmod(src, 0o4751)
    os.setxattr(src, "user.note", b"kept")
    os.setxattr(
        src, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )
    os.utime(src, ns=(1_000_000_123, 2_000_000_456))
    before = src.stat()

    # Open for writing copies up; no write yet (a write strips security.capability).
    info = await h.ops.open(await h.ino("sparse"), os.O_RDWR, CTX)
    await h.ops.release(info.fh)

    copy = layers["upper"] / "sparse"
    st = copy.stat()
    assert (st.st_uid, st.st_gid, st.st_mode) == (1234, 5678, before.st_mode)
    assert st.st_blocks * 512 < 1 << 20, "holes were filled"
    assert os.getxattr(copy, "user.note") == b"kept"
    assert os.getxattr(copy, "security.capability") == os.getxattr(src, "security.capability")
    await h.write("sparse", b"HEAD")
    data = await h.read("sparse")
    assert data[:4] == b"HEAD" and data[-4:] == b"tail" and len(data) == (8 << 20) + 4
    assert src.read_bytes()[:4] == b"head", "the lower layer changed"
    listed = await h.ops.listxattr(await h.ino("sparse"), CTX)
    assert b"user.note" in listed and not any(b"fusemount" in n for n in listed)


@pytest.mark.trio
async def test_copy_up_copies_parents_with_their_attributes(
    h: Harness, layers: dict[str, Path]
) -> None:
    sub = layers["l2"] / "d" / "sub"
    os.chmod(sub, 0o701)
    os.chown(sub, 7, 8)
    os.utime(sub, ns=(5_000_000_001, 6_000_000_002))
    await h.write("d/sub/f", b"DEEP")
    st = (layers["upper"] / "d" / "sub").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o701, 7, 8)
    assert st.st_mtime_ns == 6_000_000_002, "the parent's times changed on copy-up"
    assert (layers["upper"] / "d" / "sub" / "f").read_bytes() == b"DEEP"


@pytest.mark.trio
async def test_setattr_copies_up(h: Harness, layers: dict[str, Path]) -> None:
    os.utime(layers["l2"] / "only2", ns=(9_000_000_000, 1_000_000_000))
    ino = await h.ino("only2")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_uid, attr.st_gid = 42, 43
    attr.st_mtime_ns = 123_456_789_012
    attr.st_size = 0
    out = await h.ops.setattr(
        ino, attr, fields(mode=True, uid=True, gid=True, mtime=True), None, CTX
    )
    st = (layers["upper"] / "only2").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 42, 43)
    assert st.st_mtime_ns == out.st_mtime_ns == 123_456_789_012
    assert st.st_atime_ns == 9_000_000_000, "UTIME_OMIT changed the atime"
    await h.ops.setattr(ino, attr, fields(size=True), None, CTX)
    assert (layers["upper"] / "only2").stat().st_size == 0
    assert out.st_ino == ino


@pytest.mark.trio
async def test_write_after_kernel_set_mtime_keeps_it(h: Harness, layers: dict[str, Path]) -> None:
    """Under the writeback cache a page WRITE may arrive after the SETATTR carrying the
    kernel's mtime; the WRITE must not restamp the backing file (the kernel owns mtime)."""
    assert h.ops.enable_writeback_cache
    ino = await h.ino("only2")
    info = await h.ops.open(ino, os.O_RDWR, CTX)
    try:
        attr = pyfuse3.EntryAttributes()
        attr.st_mtime_ns = 1_700_000_000_123_456_789
        await h.ops.setattr(ino, attr, fields(mtime=True), info.fh, CTX)
        assert await h.ops.write(info.fh, 0, b"late page") == 9
    finally:
        await h.ops.release(info.fh)
    st = (layers["upper"] / "only2").stat()
    assert st.st_mtime_ns == 1_700_000_000_123_456_789
    assert (layers["upper"] / "only2").read_bytes() == b"late page"


@pytest.mark.trio
async def test_xattr_changes_copy_up_and_internal_names_are_hidden(
    h: Harness, layers: dict[str, Path]
) -> None:
    ino = await h.ino("only2")
    await h.ops.setxattr(ino, b"user.k", b"v", CTX)
    assert os.getxattr(layers["upper"] / "only2", "user.k") == b"v"
    assert await h.ops.getxattr(ino, b"user.k", CTX) == b"v"
    with pytest.raises(pyfuse3.FUSEError):
        await h.ops.getxattr(ino, ORIGIN_XATTR.encode(), CTX)
    with pytest.raises(pyfuse3.FUSEError):
        await h.ops.setxattr(ino, b"trusted.overlay.opaque", b"y", CTX)
    await h.ops.removexattr(ino, b"user.k", CTX)
    assert b"user.k" not in await h.ops.listxattr(ino, CTX)


@pytest.mark.trio
async def test_file_opened_before_copy_up_sees_new_data(h: Harness) -> None:
    ino = await h.ino("only2")
    reader = await h.ops.open(ino, os.O_RDONLY, CTX)
    assert await h.ops.read(reader.fh, 0, 10) == b"2"
    writer = await h.ops.open(ino, os.O_RDWR, CTX)
    await h.ops.write(writer.fh, 0, b"changed")
    assert await h.ops.read(reader.fh, 0, 10) == b"changed"
    await h.ops.release(writer.fh)
    await h.ops.release(reader.fh)


@pytest.mark.trio
async def test_open_unlinked_upper_file_keeps_working(h: Harness) -> None:
    ino = await h.create("tmpfile", b"data")
    info = await h.ops.open(ino, os.O_RDWR, CTX)
    await h.unlink("tmpfile")
    await h.ops.write(info.fh, 4, b"more")
    assert await h.ops.read(info.fh, 0, 100) == b"datamore"
    assert (await h.ops.getattr(ino, CTX)).st_nlink == 0
    await h.ops.release(info.fh)


# -- removing ---------------------------------------------------------------------------------


@pytest.mark.trio
async def test_unlink_whiteouts_only_lower_names(h: Harness, layers: dict[str, Path]) -> None:
    upper = layers["upper"]
    await h.unlink("only2")
    assert whiteout_present(upper, "only2", h.whiteout)
    assert "only2" not in await h.listdir("")
    await h.create("fresh", b"1")
    await h.unlink("fresh")
    assert not os.path.lexists(upper / "fresh") and not os.path.lexists(upper / ".wh.fresh")
    await h.write("a", b"changed")
    await h.unlink("a")
    assert whiteout_present(upper, "a", h.whiteout)
    assert "a" not in await h.listdir("")


@pytest.mark.trio
async def test_rmdir_of_merged_dir_and_mkdir_over_it(h: Harness, layers: dict[str, Path]) -> None:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await h.rmdir("d")
    assert exc.value.errno == errno.ENOTEMPTY
    for name in ("d/sub/f", "d/x", "d/y"):
        await h.unlink(name)
    await h.rmdir("d/sub")
    await h.rmdir("d")
    assert whiteout_present(layers["upper"], "d", h.whiteout)
    assert "d" not in await h.listdir("")

    await h.mkdir("d")
    assert await h.listdir("d") == {}
    up = layers["upper"] / "d"
    if h.whiteout is wh.WhiteoutFormat.OVERLAY:
        assert os.getxattr(up, wh.OVERLAY_OPAQUE_XATTR) == b"y"
    else:
        assert (up / wh.WHITEOUT_OPAQUE).exists()
    await h.create("d/again", b"z")
    assert sorted(await h.listdir("d")) == ["again"]


@pytest.mark.trio
async def test_create_over_whiteout_replaces_it(h: Harness, layers: dict[str, Path]) -> None:
    await h.unlink("only2")
    await h.create("only2", b"reborn")
    assert await h.read("only2") == b"reborn"
    assert not whiteout_present(layers["upper"], "only2", h.whiteout)


# -- rename -----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_rename_of_lower_file_leaves_a_whiteout(h: Harness, layers: dict[str, Path]) -> None:
    ino = await h.ino("only2")
    await h.rename("only2", "moved")
    assert await h.read("moved") == b"2"
    assert await h.ino("moved") == ino
    assert whiteout_present(layers["upper"], "only2", h.whiteout)
    assert sorted(await h.listdir("")) == ["a", "d", "moved"]


@pytest.mark.trio
async def test_rename_of_lower_directory(h: Harness, layers: dict[str, Path]) -> None:
    inos = {p: await h.ino(p) for p in ("d", "d/sub", "d/sub/f", "d/x", "d/y")}
    await h.write("d/y", b"Y2")
    await h.rename("d", "e")
    assert "d" not in await h.listdir("")
    assert sorted(await h.listdir("e")) == ["sub", "x", "y"]
    assert await h.read("e/sub/f") == b"deep"
    assert await h.read("e/y") == b"Y2"
    for path, ino in inos.items():
        assert await h.ino("e" + path[1:]) == ino, path
    assert whiteout_present(layers["upper"], "d", h.whiteout)
    # The name is free again and can hold a new, empty directory.
    await h.mkdir("d")
    assert await h.listdir("d") == {}


@pytest.mark.trio
async def test_rename_noreplace_and_exchange(h: Harness) -> None:
    await h.create("p", b"P")
    await h.create("q", b"Q")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await h.rename("p", "q", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    await h.rename("p", "a", RENAME_EXCHANGE)
    assert await h.read("a") == b"P" and await h.read("p") == b"top"


# -- inode numbers and hardlinks --------------------------------------------------------------


@pytest.mark.trio
async def test_hardlinked_lower_file_stays_one_inode(h: Harness, layers: dict[str, Path]) -> None:
    l2 = layers["l2"]
    (l2 / "h1").write_bytes(b"shared")
    os.link(l2 / "h1", l2 / "d" / "sub" / "h2")
    first = await h.lookup("h1")
    assert first.st_nlink == 2
    assert (await h.lookup("d/sub/h2")).st_ino == first.st_ino

    await h.write("h1", b"SHARED")

    assert await h.read("d/sub/h2") == b"SHARED"
    again = await h.lookup("d/sub/h2")
    assert (again.st_ino, again.st_nlink) == (first.st_ino, 2)
    up1, up2 = layers["upper"] / "h1", layers["upper"] / "d" / "sub" / "h2"
    assert up1.stat().st_ino == up2.stat().st_ino and up1.stat().st_nlink == 2


@pytest.mark.trio
async def test_inode_numbers_survive_copy_up_and_remount(layers: dict[str, Path]) -> None:
    lowers = [layers["l1"], layers["l2"]]
    first = Harness(lowers, layers["upper"], layers["work"])
    paths = ["a", "only2", "d", "d/sub", "d/sub/f"]
    before = {p: await first.ino(p) for p in paths}
    st = (layers["l2"] / "only2").stat()
    assert before["only2"] == (1 << ORIGIN_SHIFT) | st.st_ino, "origin is (layer 1, st_ino)"
    await first.write("only2", b"x")
    await first.write("d/sub/f", b"y")
    assert await first.ino("only2") == before["only2"]
    origin = os.getxattr(layers["upper"] / "only2", ORIGIN_XATTR)
    assert decode_origin(origin) == before["only2"]
    await check_upper(first)
    first.close()

    second = Harness(lowers, layers["upper"], layers["work"])
    assert {p: await second.ino(p) for p in paths} == before
    second.close()


# -- read-only --------------------------------------------------------------------------------


@pytest.mark.trio
async def test_lowers_only_is_read_only(layers: dict[str, Path]) -> None:
    h = Harness([layers["l1"], layers["l2"]], None, None)
    assert await h.read("a") == b"top"
    for attempt in (
        h.create("new"),
        h.unlink("a"),
        h.ops.open(await h.ino("a"), os.O_WRONLY, CTX),
        h.mkdir("x"),
    ):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await attempt
        assert exc.value.errno == errno.EROFS
    h.close()


@pytest.mark.trio
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
async def test_deep_stack_uses_the_lower_index(tmp_path: Path, fmt: wh.WhiteoutFormat) -> None:
    """Twenty lowers: lookups and listings come from the lower index and agree with the rules
    (top wins, whiteouts of both formats, a file over a directory, opaque directories)."""
    lowers = [tmp_path / f"l{i:02d}" for i in range(20)]  # l00 is the top
    for i, layer in enumerate(lowers):
        (layer / "d").mkdir(parents=True)
        (layer / f"f{i}").write_bytes(b"%d" % i)
        (layer / "same").write_bytes(b"%d" % i)
        (layer / "d" / f"g{i}").write_bytes(b"g")
    os.mknod(lowers[3] / "f10", stat.S_IFCHR, 0)
    (lowers[4] / ".wh.f11").touch()
    (lowers[5] / "d" / ".wh..wh..opq").touch()
    (lowers[2] / "f12").mkdir()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    h = Harness(lowers, upper, work, fmt)
    expected = {f"f{i}" for i in range(20)} - {"f10", "f11"} | {"same", "d"}
    assert set(await h.listdir("")) == expected
    assert sorted(await h.listdir("d")) == sorted(f"g{i}" for i in range(6))
    assert await h.read("same") == b"0"
    assert await h.read("f19") == b"19"
    assert (await h.lookup("f12")).st_mode & stat.S_IFDIR
    with pytest.raises(pyfuse3.FUSEError):
        await h.lookup("f10")
    assert h.ops.tree._indexes, "the index was not used"
    await h.unlink("f19")
    await h.create("f10", b"new")
    assert set(await h.listdir("")) == expected - {"f19"} | {"f10"}
    await h.mkdir("d/sub")
    assert "sub" in await h.listdir("d")
    await check_upper(h)
    h.close()
