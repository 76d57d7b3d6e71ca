"""File types and attributes: what a layer holds, a child of it shows unchanged.

Every part of :mod:`graphdrivers.conformance.corpus` is written into a base layer and must read
back the same, with nanosecond mtimes, in the base and in a child and a grandchild.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance import corpus
from graphdrivers.conformance.helpers import make_layer, populated, tree, write
from graphdrivers.conformance.manifest import Manifest, assert_same_tree, manifest


def _written(driver: Any, caps: Any, part: corpus.Part) -> Manifest:
    """Write ``part`` into the layer "base" and return the manifest of what was written."""
    return populated(driver, "base", lambda root: part(root, caps), mtimes=True)


@pytest.mark.parametrize("part", sorted(corpus.PARTS))
def test_layer_keeps(driver: Any, caps: Any, part: str) -> None:
    """What is written into a layer reads back the same after it is put and got again."""
    expected = _written(driver, caps, corpus.PARTS[part])
    assert_same_tree(expected, tree(driver, "base", mtimes=True), f"layer after writing {part}")


@pytest.mark.parametrize("part", sorted(corpus.PARTS))
def test_snapshot_keeps(driver: Any, caps: Any, part: str) -> None:
    """A child and a grandchild show the parent's entries with every attribute."""
    expected = _written(driver, caps, corpus.PARTS[part])
    driver.create("child", "base")
    driver.create("grandchild", "child")
    assert_same_tree(expected, tree(driver, "child", mtimes=True), f"child of a layer with {part}")
    assert_same_tree(
        expected, tree(driver, "grandchild", mtimes=True), f"grandchild of a layer with {part}"
    )


def test_snapshot_keeps_everything(driver: Any, caps: Any) -> None:
    """All parts at once, with directory mtimes too (but the root's: a union's is its own)."""
    driver.create("base")
    with driver.mounted("base") as root:
        corpus.populate_all(Path(root), caps)
        corpus.set_dir_mtimes(Path(root))
        expected = manifest(Path(root), mtimes=True, dir_mtimes=True)
    driver.create("child", "base")
    got = tree(driver, "child", mtimes=True, dir_mtimes=True)
    got["/"] = dataclasses.replace(got["/"], mtime_ns=expected["/"].mtime_ns)
    assert_same_tree(
        expected,
        got,
        "child of a layer with every file type",
    )


def test_snapshot_keeps_holes(driver: Any, caps: Any) -> None:
    """A sparse file stays sparse in a child (a full copy must not fill the holes)."""
    _written(driver, caps, corpus.sparse)
    driver.create("child", "base")
    with driver.mounted("child") as root:
        path = Path(root) / "sparse/file"
        st = os.lstat(path)
        assert corpus.is_sparse(path), (
            f"{st.st_blocks * 512} bytes allocated for a {st.st_size}-byte file with "
            f"{len(corpus.SPARSE_CHUNKS) * 4096} bytes of data: the holes were filled"
        )
        with open(path, "rb") as f:
            for offset in corpus.SPARSE_CHUNKS:
                f.seek(offset)
                assert f.read(4096) == b"D" * 4096, f"data at {offset} lost"


def test_hardlink_to_lower_file(driver: Any) -> None:
    """A hardlink made in a child to a file of its parent is one inode with two names."""
    make_layer(driver, "base", None, lambda r: write(r, "lower/file", b"shared", mode=0o604))
    base_tree = tree(driver, "base")

    def link(root: Path) -> None:
        os.makedirs(root / "upper", exist_ok=True)
        os.link(root / "lower/file", root / "upper/link")

    make_layer(driver, "child", "base", link)
    driver.create("grandchild", "child")
    for layer in ("child", "grandchild"):
        with driver.mounted(layer) as root:
            a, b = os.lstat(Path(root) / "lower/file"), os.lstat(Path(root) / "upper/link")
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), f"{layer}: two inodes"
            assert a.st_nlink == 2, f"{layer}: link count {a.st_nlink}"
            assert (Path(root) / "upper/link").read_bytes() == b"shared"
    assert_same_tree(base_tree, tree(driver, "base"), "parent after a child linked to its file")


def test_write_in_child_spares_parent_hardlinks(driver: Any) -> None:
    """Writing through one name of a lower hardlink group changes every name in the child only."""

    def group(root: Path) -> None:
        write(root, "a", b"before")
        os.link(root / "a", root / "b")

    make_layer(driver, "base", None, group)
    base_tree = tree(driver, "base")
    make_layer(driver, "child", "base", lambda r: (r / "a").write_bytes(b"after!"))
    with driver.mounted("child") as root:
        assert (Path(root) / "b").read_bytes() == b"after!", "the other name kept old data"
    assert_same_tree(base_tree, tree(driver, "base"), "parent after a child wrote to a link")
