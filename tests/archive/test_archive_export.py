"""export_changes / export_tree: the tar they write, determinism, streaming, and IteratorStream."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest
from archive_helpers import copy_tree, manifest

from graphdrivers.archive import changes_dirs, export_changes, export_tree
from graphdrivers.archive.tarstream import IteratorStream


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "etc" / "sub").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.utime(root / "etc" / "passwd", ns=(0, 1_600_000_000_000_000_000))
    (root / "etc" / "frac").write_text("f")
    os.utime(root / "etc" / "frac", ns=(0, 1_600_000_000_123_456_789))
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"\x7fELF" * 100)
    os.chown(root / "bin" / "tool", 1000, 1001)
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.setxattr(root / "etc" / "passwd", "user.b", b"2")
    os.setxattr(root / "etc" / "passwd", "user.a", b"\x00\xff binary")
    os.setxattr(root / "etc" / "passwd", "trusted.t", b"t")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / ("long-" + "n" * 120)).write_text("long name")
    (root / "ünïcode").write_text("u")
    return root


def test_tree_export_entries(tree: Path) -> None:
    data = b"".join(export_tree(tree))
    got = {m.name: m for m in members(data)}
    assert sorted(got) == sorted(
        [
            "abs-link",
            "bin",
            "bin/tool",
            "bin/tool-link",
            "etc",
            "etc/frac",
            "etc/passwd",
            "etc/sub",
            "fifo",
            "long-" + "n" * 120,
            "null",
            "ünïcode",
        ]
    )
    names_in_order = [m.name for m in members(data)]
    assert names_in_order == sorted(names_in_order)

    tool, link = got["bin/tool"], got["bin/tool-link"]
    assert tool.isreg() and (tool.mode, tool.uid, tool.gid, tool.size) == (0o4755, 1000, 1001, 400)
    assert link.islnk() and link.linkname == "bin/tool" and link.size == 0
    assert got["abs-link"].issym() and got["abs-link"].linkname == "/etc/passwd"
    assert got["fifo"].isfifo()
    assert got["null"].ischr() and (got["null"].devmajor, got["null"].devminor) == (1, 3)
    assert got["etc"].isdir()
    for m in got.values():
        assert m.uname == "" and m.gname == ""

    passwd = got["etc/passwd"]
    assert passwd.pax_headers["SCHILY.xattr.user.a"].encode("utf-8", "surrogateescape") == (
        b"\x00\xff binary"
    )
    assert passwd.pax_headers["SCHILY.xattr.user.b"] == "2"
    assert passwd.pax_headers["SCHILY.xattr.trusted.t"] == "t"
    assert "mtime" not in passwd.pax_headers  # whole seconds need no PAX record
    assert got["etc/frac"].pax_headers["mtime"] == "1600000000.123456789"


def test_directories_carry_a_trailing_slash(tree: Path) -> None:
    raw = b"".join(export_tree(tree))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        dirs = [m for m in tar.getmembers() if m.isdir()]
    offsets = [raw.find(f"{d.name}/\x00".encode()) for d in dirs]
    assert all(o >= 0 for o in offsets)


def test_export_is_deterministic_across_runs_and_copies(tree: Path, tmp_path: Path) -> None:
    first = b"".join(export_tree(tree))
    assert b"".join(export_tree(tree)) == first
    copy = tmp_path / "copy"
    copy_tree(tree, copy)
    assert b"".join(export_tree(copy)) == first


def test_whiteouts_sort_where_the_deleted_path_sorts(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    for name in ("a", "m", "z"):
        (base / "d" / name).write_text(name)
    upper = tmp_path / "upper"
    copy_tree(base, upper)
    (upper / "d" / "m").unlink()
    (upper / "d" / "b").write_text("b")
    (upper / "d" / "n").write_text("n")

    data = b"".join(export_changes(upper, changes_dirs(upper, base)))
    got = members(data)
    assert [m.name for m in got] == ["d", "d/b", "d/.wh.m", "d/n"]
    wh = got[2]
    assert wh.isreg() and wh.size == 0 and wh.mode == 0o600 and (wh.uid, wh.gid) == (0, 0)
    assert wh.mtime == 0


def test_gnu_tar_reads_our_output(tree: Path, tmp_path: Path) -> None:
    """GNU tar extracts our tar to the same tree (a check against an independent reader)."""
    data = b"".join(export_tree(tree))
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", out],
        input=data,
        check=True,
    )
    assert manifest(out, dir_times=False) == manifest(tree, dir_times=False)


def test_socket_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "f").write_text("f")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        with caplog.at_level(logging.DEBUG, logger="graphdrivers.archive.export"):
            data = b"".join(export_tree(root))
    finally:
        sock.close()
    assert [m.name for m in members(data)] == ["f"]
    assert "socket" in caplog.text


def test_big_file_streams_in_bounded_chunks(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    with open(root / "blob", "wb") as f:
        for i in range(24):
            f.write(bytes([i + 1]) * (1 << 20))
    chunks = list(export_tree(root))
    assert max(len(c) for c in chunks) <= 2 << 20
    got = members(b"".join(chunks))
    assert got[0].size == 24 << 20


@pytest.mark.expect_warnings
def test_file_shrinking_or_growing_during_export(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "moving"
    root.mkdir()
    (root / "a-shrinks").write_bytes(b"s" * (3 << 20))
    (root / "b-grows").write_bytes(b"g" * (3 << 20))
    (root / "c-after").write_text("intact")

    out = []
    with caplog.at_level(logging.WARNING):
        stream = export_tree(root)
        out.append(next(stream))  # holds the first header; the file is being read
        os.truncate(root / "a-shrinks", 1 << 20)
        for chunk in stream:
            out.append(chunk)
            if len(out) == 5:
                with open(root / "b-grows", "ab") as f:
                    f.write(b"+" * (2 << 20))
    assert "shrank" in caplog.text and "grew" in caplog.text
    caplog.clear()

    with tarfile.open(fileobj=io.BytesIO(b"".join(out))) as tar:
        shrunk = tar.extractfile("a-shrinks").read()
        grown = tar.extractfile("b-grows").read()
        after = tar.extractfile("c-after").read()
    assert len(shrunk) == 3 << 20 and shrunk[: 1 << 20] == b"s" * (1 << 20)
    assert shrunk[2 << 20 :] == bytes(1 << 20)
    assert grown == b"g" * (3 << 20)
    assert after == b"intact"


@pytest.mark.expect_warnings
def test_missing_entry_is_skipped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "r"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("f")
    changes = changes_dirs(root, None)
    shutil.rmtree(root / "d")
    with caplog.at_level(logging.WARNING):
        data = b"".join(export_changes(root, changes))
    assert members(data) == []
    assert "vanished" in caplog.text
    caplog.clear()


# ------------------------------------------------------------------------- IteratorStream


def test_iterator_stream_reads_and_closes_once() -> None:
    calls = []
    stream = IteratorStream(iter([b"abc", b"", b"defgh"]), on_close=lambda: calls.append(1))
    assert stream.readable()
    assert stream.read(2) == b"ab"
    buf = bytearray(10)
    assert stream.readinto(buf) == 1 and buf[:1] == b"c"
    assert stream.read() == b"defgh"
    assert stream.read(5) == b""
    stream.close()
    stream.close()
    assert calls == [1]
    with pytest.raises(ValueError):
        stream.read(1)


def test_iterator_stream_on_close_after_iterator_raised() -> None:
    calls = []

    def broken():
        yield b"x"
        raise OSError("disk went away")

    with pytest.raises(OSError), IteratorStream(broken(), on_close=lambda: calls.append(1)) as s:
        s.read()
    assert calls == [1]


def test_iterator_stream_closes_generator_early() -> None:
    state = []

    def gen():
        try:
            yield b"a" * 10
            yield b"b" * 10
        finally:
            state.append("generator closed")

    with IteratorStream(gen(), on_close=lambda: state.append("on_close")) as s:
        assert s.read(3) == b"aaa"
    assert state == ["generator closed", "on_close"]


def test_iterator_stream_works_with_tarfile_stream_mode(tree: Path) -> None:
    with IteratorStream(export_tree(tree)) as s, tarfile.open(fileobj=s, mode="r|") as tar:
        names = [m.name for m in tar]
    assert "etc/passwd" in names
