"""Hostile layers: nothing outside the root may change (go-archive's testBreakout oracle).

Each case applies a malicious tar into ``dest`` next to a sibling ``victim`` directory. Either an
InvalidArchive (BreakoutError included) or success is acceptable; ``victim`` must stay byte for
byte, mode for mode the same, and nothing may appear beside ``dest`` and ``victim``.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from archive_helpers import directory, hardlink, make_tar, manifest, node, reg, symlink

from graphdrivers.archive import ApplyOptions, apply_layer
from graphdrivers.errors import BreakoutError, InvalidArchive

Member = tuple[tarfile.TarInfo, bytes | None]


def snapshot(top: Path) -> tuple[object, ...]:
    victim = top / "victim"
    st = os.lstat(victim)
    return (sorted(os.listdir(top)), manifest(victim), st.st_mode, st.st_uid, st.st_mtime_ns)


@pytest.fixture
def top(tmp_path: Path) -> Path:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("keep")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "hello").write_text("hello")
    os.chmod(victim / "hello", 0o644)
    os.chmod(victim, 0o755)
    return tmp_path


def attempt(top: Path, members: list[Member], **opts: object) -> InvalidArchive | None:
    before = snapshot(top)
    try:
        apply_layer(top / "dest", io.BytesIO(make_tar(members)), ApplyOptions(**opts))  # type: ignore[arg-type]
        error = None
    except InvalidArchive as exc:
        error = exc
    assert snapshot(top) == before, "the victim directory changed"
    return error


def victim_abs(top: Path) -> str:
    return str(top / "victim")


def test_dotdot_names(top: Path) -> None:
    for name in (
        "../victim/hello",
        "/../victim/hello",
        "a/../../victim/hello",
        "../../../../../../" + str(top)[1:] + "/victim/hello",
    ):
        assert isinstance(attempt(top, [reg(name, b"pwned")]), BreakoutError)


def test_absolute_name_is_rooted_in_dest(top: Path) -> None:
    name = victim_abs(top) + "/hello"
    assert attempt(top, [reg(name, b"inside")]) is None
    assert (top / "dest" / name[1:]).read_bytes() == b"inside"


@pytest.mark.parametrize("target", ["../victim", "../../victim", "/../victim"])
def test_relative_symlink_then_write_through(top: Path, target: str) -> None:
    assert attempt(top, [symlink("loophole", target), reg("loophole/hello", b"pwned")]) is None
    assert (top / "dest" / "victim" / "hello").read_bytes() == b"pwned"  # chroot-style


def test_absolute_symlink_as_parent(top: Path) -> None:
    members = [
        symlink("loophole", victim_abs(top)),
        reg("loophole/hello", b"pwned"),
        directory("loophole/newdir/", 0o777),
    ]
    assert attempt(top, members) is None
    assert (top / "dest" / victim_abs(top)[1:] / "hello").read_bytes() == b"pwned"


def test_two_hop_symlinks(top: Path) -> None:
    members = [
        symlink("a", "b"),
        symlink("b", "c/../../victim"),
        directory("c/"),
        reg("a/hello", b"pwned"),
        symlink("d", "/b"),
        reg("d/x", b"x"),
    ]
    attempt(top, members)


def test_symlink_pointing_at_root_then_dotdot(top: Path) -> None:
    attempt(top, [symlink("up", "/"), reg("up/../victim/hello", b"pwned")])
    attempt(top, [symlink("up", ".."), reg("up/victim/hello", b"pwned")])


def test_symlink_loop_is_invalid(top: Path) -> None:
    error = attempt(top, [symlink("a", "b"), symlink("b", "a"), reg("a/x", b"x")])
    assert isinstance(error, InvalidArchive) and "symlinks" in str(error)


def test_hardlinks_out_of_the_root(top: Path) -> None:
    assert isinstance(attempt(top, [hardlink("lnk", "../victim/hello")]), BreakoutError)
    assert attempt(top, [hardlink("lnk", victim_abs(top) + "/hello")]) is not None
    assert attempt(top, [symlink("s", "../victim"), hardlink("lnk", "s/hello")]) is not None
    assert attempt(top, [symlink("s", victim_abs(top)), hardlink("lnk", "s/hello")]) is not None


def test_hardlink_then_write_through_it(top: Path) -> None:
    members = [hardlink("lnk", "../victim/hello"), reg("lnk", b"pwned")]
    assert attempt(top, members) is not None


def test_hardlink_to_symlink_links_the_symlink(top: Path) -> None:
    members = [symlink("sym", "../victim/hello"), hardlink("hl", "sym"), reg("hl", b"new")]
    assert attempt(top, members) is None
    assert os.readlink(top / "dest" / "sym") == "../victim/hello"
    assert (top / "dest" / "hl").read_bytes() == b"new"


def test_hardlink_to_directory_is_invalid(top: Path) -> None:
    error = attempt(top, [directory("d/"), hardlink("x", "d")])
    assert error is not None and "directory" in str(error)
    assert attempt(top, [hardlink("x", "/")]) is not None


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "keepdir/.wh.", "keepdir/.wh.."])
def test_invalid_whiteout_names(top: Path, name: str) -> None:
    (top / "dest" / "keepdir").mkdir()
    (top / "dest" / "keepdir" / "f").write_text("f")
    assert attempt(top, [reg(name)]) is not None
    assert (top / "dest" / "keep").read_text() == "keep"
    assert (top / "dest" / "keepdir" / "f").read_text() == "f"


def test_whiteout_names_as_directories_are_invalid(top: Path) -> None:
    assert attempt(top, [reg(".wh.x/file", b"x")]) is not None


@pytest.mark.parametrize("mode", ["delete", "overlay"])
def test_whiteouts_under_symlinked_parents(top: Path, mode: str) -> None:
    for target in ("../victim", victim_abs(top), "/.."):
        members = [symlink("s", target), reg("s/.wh.hello"), reg("s/.wh..wh..opq")]
        attempt(top, members, whiteouts=mode)
        attempt(top, [symlink("t", target), reg("t/.wh..wh..opq")], whiteouts=mode)


def test_empty_and_dot_names_leave_root_metadata(top: Path) -> None:
    dest = top / "dest"
    os.chmod(dest, 0o750)
    before = os.lstat(dest)
    for member in (
        directory("", 0o777, uid=5),
        directory(".", 0o777, uid=5),
        reg("", b"x"),
        reg(".", b"x"),
        symlink(".", "/"),
    ):
        attempt(top, [member])
        after = os.lstat(dest)
        assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
            before.st_mode,
            before.st_uid,
            before.st_mtime_ns,
        )


def test_chmod_chown_utime_through_colliding_symlink(top: Path) -> None:
    dest = top / "dest"
    os.symlink(victim_abs(top) + "/hello", dest / "evil")
    os.symlink(victim_abs(top), dest / "evildir")
    os.symlink("../victim/hello", dest / "evil-rel")
    members = [
        reg("evil", b"replaced", 0o777, uid=1234),
        directory("evildir/", 0o777, uid=1234),
        node("evil-rel", tarfile.FIFOTYPE, 0o777, uid=1234),
    ]
    assert attempt(top, members) is None
    assert (dest / "evil").read_bytes() == b"replaced"
    assert os.path.isdir(dest / "evildir") and not os.path.islink(dest / "evildir")


def test_directory_entry_over_symlink_keeps_victim_mode(top: Path) -> None:
    os.symlink("../victim", top / "dest" / "v")
    assert attempt(top, [directory("v/", 0o777), reg("v/hello", b"pwned")]) is None
    assert (top / "dest" / "v" / "hello").read_bytes() == b"pwned"


def test_non_directory_parent_is_invalid(top: Path) -> None:
    error = attempt(top, [reg("keep/x", b"x")])
    assert error is not None and "not a directory" in str(error)


def test_device_refused_without_option(top: Path) -> None:
    dev = node("disk", tarfile.BLKTYPE, 0o666, devmajor=8, devminor=0)
    assert attempt(top, [dev], allow_devices=False) is not None
    assert not os.path.lexists(top / "dest" / "disk")


def test_nul_in_names_is_invalid(top: Path) -> None:
    info, data = reg("ok", b"x")
    info.pax_headers = {"path": "a\x00/../../victim/hello"}
    assert attempt(top, [(info, data)]) is not None
