"""changes(): the exact list of added, modified and deleted paths, with moby's rules.

The rules held here: a directory with any change below it that is not itself added gets a Modify;
a deleted subtree is one Delete; ``/`` is never listed; a directory whose only change is its
mtime is not a change; a change of mode, owner, content, symlink target or security.capability
is a Modify.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance import corpus
from graphdrivers.conformance.helpers import make_layer, mkdir, tree, write
from graphdrivers.driver import Change, Kind

A, C, D = Kind.ADD, Kind.MODIFY, Kind.DELETE

# DriverTestEcho's chain: /subdir1/.../subdir9/file, one path per depth.
ECHO_DEPTH = 10
ECHO_PATHS = ["/" + "/".join(f"subdir{j}" for j in range(1, i + 1)) for i in range(1, ECHO_DEPTH)]
ECHO_PATHS.append(ECHO_PATHS[-1] + "/file")


def assert_changes(got: list[Any], expected: list[tuple[str, Kind]], what: str) -> None:
    """Compare as sorted lists of (path, kind), and say which entries are wrong."""
    have = sorted((c.path, Kind(c.kind)) for c in got)
    want = sorted(expected)
    if have == want:
        return
    lines = [f"- {Change(p, k)}" for p, k in want if (p, k) not in have]
    lines += [f"+ {Change(p, k)}" for p, k in have if (p, k) not in want]
    raise AssertionError(
        f"{what}: wrong changes (- expected but missing, + reported but wrong)\n"
        + "\n".join(lines)
        + "\nall reported: "
        + ", ".join(str(Change(p, k)) for p, k in have)
    )


def test_changes_exact(driver: Any) -> None:
    """moby DriverTestChanges: modify, add and delete in one dir, plus that dir's Modify."""

    def base(root: Path) -> None:
        for i in range(20):
            write(root, f"directory-0/file-{i}", f"content {i}".encode())

    expected: list[tuple[str, Kind]] = [("/directory-0", C)]

    def upper(root: Path) -> None:
        for i in range(20):
            path = f"/directory-0/file-{i}"
            if i % 3 == 0:
                write(root, path[1:], f"changed content {i}".encode())
                expected.append((path, C))
            elif i % 3 == 1:
                write(root, f"directory-0/added-{i}", b"new")
                expected.append((f"/directory-0/added-{i}", A))
            else:
                os.unlink(root / path[1:])
                expected.append((path, D))

    make_layer(driver, "base", None, base)
    make_layer(driver, "upper", "base", upper)
    assert_changes(driver.changes("upper", "base"), expected, "changes(upper, base)")


def test_changes_without_parent_all_add(driver: Any, caps: Any) -> None:
    """changes(id) lists every path of the layer as an Add, and never '/'."""
    make_layer(driver, "base", None, lambda r: corpus.regular(r, caps))
    make_layer(driver, "upper", "base", lambda r: write(r, "more/file", b"x"))
    paths = [p for p in tree(driver, "upper") if p != "/"]
    assert_changes(driver.changes("upper"), [(p, A) for p in paths], "changes(upper)")


def test_changes_unchanged_layer_empty(driver: Any, caps: Any) -> None:
    """A child nobody wrote to has no changes against its parent."""
    make_layer(driver, "base", None, lambda r: corpus.regular(r, caps))
    driver.create("child", "base")
    assert_changes(driver.changes("child", "base"), [], "changes of an untouched child")
    assert driver.diff_size("child", "base") == 0


@pytest.mark.parametrize("depth", range(ECHO_DEPTH))
def test_changes_echo(driver: Any, depth: int) -> None:
    """c/storage DriverTestEcho: delete a subtree at a depth, then recreate it."""
    make_layer(driver, "base", None, lambda r: write(r, ECHO_PATHS[-1][1:], b"echo"))
    make_layer(driver, "deleted", "base", lambda r: _rm(r / ECHO_PATHS[depth][1:]))
    ancestors = [(p, C) for p in ECHO_PATHS[:depth]]
    assert_changes(
        driver.changes("deleted", "base"),
        [*ancestors, (ECHO_PATHS[depth], D)],
        f"delete at depth {depth}",
    )

    make_layer(driver, "recreated", "deleted", lambda r: write(r, ECHO_PATHS[-1][1:], b"echo"))
    added = [(p, A) for p in ECHO_PATHS[depth:]]
    assert_changes(
        driver.changes("recreated", "deleted"), [*ancestors, *added], f"recreate at depth {depth}"
    )


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_changes_dir_mtime_only_is_no_change(driver: Any) -> None:
    """A directory whose only change is its mtime is not reported."""
    make_layer(driver, "base", None, lambda r: write(r, "dir/file", b"x"))
    make_layer(
        driver,
        "upper",
        "base",
        lambda r: os.utime(r / "dir", ns=(corpus.DIR_MTIME_NS, corpus.DIR_MTIME_NS)),
    )
    assert_changes(driver.changes("upper", "base"), [], "changes after touching a dir")


def test_changes_metadata_only(driver: Any) -> None:
    """chmod and chown alone are Modify, with the parent dir's Modify."""

    def base(root: Path) -> None:
        write(root, "d/chmod", b"x")
        write(root, "d/chown", b"x")
        write(root, "top", b"x")
        mkdir(root, "e/sub")

    def upper(root: Path) -> None:
        os.chmod(root / "d/chmod", 0o600)
        os.chown(root / "d/chown", 1000, 1000)
        os.chmod(root / "top", 0o640)
        os.chmod(root / "e/sub", 0o700)

    make_layer(driver, "base", None, base)
    make_layer(driver, "upper", "base", upper)
    expected = [("/d", C), ("/d/chmod", C), ("/d/chown", C), ("/top", C), ("/e", C), ("/e/sub", C)]
    assert_changes(driver.changes("upper", "base"), expected, "chmod/chown-only changes")


def test_changes_capability_is_modify(driver: Any, caps: Any) -> None:
    """Setting security.capability on a lower file is a Modify."""
    make_layer(driver, "base", None, lambda r: write(r, "bin/ping", b"\x7fELF", mode=0o755))

    def add_cap(root: Path) -> None:
        corpus._require_root("files with security.capability")
        corpus._setxattr(
            root / "bin/ping", corpus.CAP_XATTR, corpus.CAPABILITY, "security.capability"
        )

    make_layer(driver, "upper", "base", add_cap)
    assert_changes(
        driver.changes("upper", "base"), [("/bin", C), ("/bin/ping", C)], "a capability added"
    )


def test_changes_links(driver: Any) -> None:
    """A new hardlink to a lower file is an Add; a retargeted symlink is a Modify."""

    def base(root: Path) -> None:
        write(root, "f", b"x")
        os.symlink("f", root / "link")

    def upper(root: Path) -> None:
        os.link(root / "f", root / "new-link")
        os.unlink(root / "link")
        os.symlink("somewhere/else", root / "link")

    make_layer(driver, "base", None, base)
    make_layer(driver, "upper", "base", upper)
    assert_changes(
        driver.changes("upper", "base"), [("/new-link", A), ("/link", C)], "link changes"
    )


def test_changes_deleted_subtree_is_one_delete(driver: Any) -> None:
    """rm -r of a dir is one Delete; the parent gets a Modify; children are not listed."""
    make_layer(driver, "base", None, lambda r: write(r, "a/b/c/d/file", b"x"))
    make_layer(driver, "upper", "base", lambda r: shutil.rmtree(r / "a/b"))
    assert_changes(driver.changes("upper", "base"), [("/a", C), ("/a/b", D)], "rm -r a/b")
