"""Layer lifecycle: create, snapshot, deep chains, listing, parents, metadata, status, cleanup."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.fixtures import Case
from graphdrivers.conformance.helpers import (
    create_base,
    listing,
    make_layer,
    tree,
    verify_base,
    write,
)
from graphdrivers.conformance.manifest import assert_same_tree

# How deep the chain of DeepLayerRead goes (capped at the driver's max_depth).
DEEP_CHAIN = 50


def test_create_empty(driver: Any) -> None:
    """A layer with no parent exists, and its root is an empty 0755 directory owned by root."""
    driver.create("empty-layer")
    assert driver.exists("empty-layer")

    with driver.mounted("empty-layer") as root:
        st = os.lstat(root)
        assert stat.S_ISDIR(st.st_mode), f"mountpoint {root} is not a directory"
        assert stat.S_IMODE(st.st_mode) == 0o755, f"root mode {stat.S_IMODE(st.st_mode):04o}"
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), (
            f"root owned {st.st_uid}:{st.st_gid}"
        )
        assert listing(Path(root)) == [], f"a new layer holds {listing(Path(root))}"

    driver.remove("empty-layer")
    assert not driver.exists("empty-layer")


def test_create_base(driver: Any) -> None:
    """Special mode bits and owners written into a layer read back unchanged."""
    create_base(driver, "base")
    with driver.mounted("base") as root:
        verify_base(Path(root))


def test_create_snapshot(driver: Any) -> None:
    """A child starts with its parent's content and metadata."""
    create_base(driver, "base")
    driver.create("snap", "base")
    with driver.mounted("snap") as root:
        verify_base(Path(root))
    assert_same_tree(
        tree(driver, "base", mtimes=True), tree(driver, "snap", mtimes=True), "snapshot of base"
    )


def test_snapshot_is_independent(driver: Any) -> None:
    """Changing a child changes neither its parent nor a sibling."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"base"))
    before = tree(driver, "base")
    make_layer(driver, "child", "base", lambda r: write(r, "f", b"child"))
    driver.create("sibling", "base")

    assert_same_tree(before, tree(driver, "base"), "base after its child changed")
    assert_same_tree(before, tree(driver, "sibling"), "sibling after another child changed")


def test_root_mode_propagates(driver: Any) -> None:
    """A chmod of a layer's root is inherited by its children and grandchildren."""
    create_base(driver, "base")
    make_layer(driver, "mid", "base", lambda r: os.chmod(r, 0o711))
    driver.create("top", "mid")
    with driver.mounted("top") as root:
        mode = stat.S_IMODE(os.lstat(root).st_mode)
    assert mode == 0o711, f"grandchild root mode {mode:04o}, expected 0711 from its grandparent"


def _deep_chain_depth(caps: Any) -> int:
    return min(DEEP_CHAIN, caps.max_depth) if caps.max_depth else DEEP_CHAIN


def test_deep_chain_read(driver: Any, caps: Any) -> None:
    """moby DeepLayerRead: every layer of a long chain shows every ancestor's marker."""
    depth = _deep_chain_depth(caps)
    make_layer(driver, "layer-0", None, lambda r: write(r, "testfile.txt", b"base"))

    for i in range(1, depth + 1):

        def mark(root: Path, i: int = i) -> None:
            (root / "top-id").write_text(f"layer-{i}")
            write(root, f"layer-{i}/layer-id", f"layer-{i}".encode())
            write(root, f"layer-{i}/parent-id", f"layer-{i - 1}".encode())

        make_layer(driver, f"layer-{i}", f"layer-{i - 1}", mark)

    with driver.mounted(f"layer-{depth}", readonly=True) as root:
        root = Path(root)
        assert (root / "top-id").read_text() == f"layer-{depth}"
        assert (root / "testfile.txt").read_bytes() == b"base"
        for i in range(1, depth + 1):
            assert (root / f"layer-{i}/layer-id").read_text() == f"layer-{i}"
            assert (root / f"layer-{i}/parent-id").read_text() == f"layer-{i - 1}"
    assert driver.parent(f"layer-{depth}") == f"layer-{depth - 1}"


UNLIMITED_PROBE_DEPTH = 130  # past 128 lowers, where overlay mount option strings overflow


def test_max_depth_enforced(driver: Any, caps: Any) -> None:
    """The advertised max_depth holds exactly: a chain of that many layers (the base counts)
    mounts, one layer more is refused with a DriverError and leaves no layer. A driver
    advertising no limit must take a chain of :data:`UNLIMITED_PROBE_DEPTH` layers and mount
    its top."""
    from graphdrivers.errors import DriverError

    limit = caps.max_depth
    depth = limit or UNLIMITED_PROBE_DEPTH
    driver.create("layer-0")
    for i in range(1, depth):
        driver.create(f"layer-{i}", f"layer-{i - 1}")
    top = f"layer-{depth - 1}"

    if limit:
        with driver.mounted(top, readonly=True) as root:
            assert Path(root).is_dir()
        with pytest.raises(DriverError):
            driver.create("too-deep", top)
        assert not driver.exists("too-deep")
    else:
        driver.create("one-more", top)
        with driver.mounted("one-more", readonly=True) as root:
            assert Path(root).is_dir()


def test_list_layers_exact_and_children_first(driver: Any) -> None:
    """list_layers names each layer once, before its parent: an order they can be removed in."""
    driver.create("base")
    driver.create("mid", "base")
    driver.create("upper", "mid")
    driver.create("branch", "base")
    driver.create("other")

    layers = driver.list_layers()
    assert sorted(layers) == ["base", "branch", "mid", "other", "upper"], layers
    for child, parent in [("upper", "mid"), ("mid", "base"), ("branch", "base")]:
        assert layers.index(child) < layers.index(parent), f"{child} after {parent}: {layers}"

    for layer in layers:
        driver.remove(layer)
    assert driver.list_layers() == []


def test_parent_and_metadata(driver: Any) -> None:
    """parent() gives the creating parent; metadata() has a Parent key and string values."""
    driver.create("base")
    driver.create("child", "base", rw=True)
    assert driver.parent("base") is None
    assert driver.parent("child") == "base"

    base_meta, child_meta = driver.metadata("base"), driver.metadata("child")
    assert base_meta["Parent"] == "", base_meta
    assert child_meta["Parent"] == "base", child_meta
    for meta in (base_meta, child_meta):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()), meta


def test_status_structured(driver: Any) -> None:
    """status() reports the driver, home, layer count and mount count as fields."""
    driver.create("base")
    driver.create("child", "base")
    status = driver.status()
    assert status.driver == driver.name
    assert Path(status.home) == Path(driver.home)
    assert status.layers == 2
    assert status.mounted == 0
    assert isinstance(status.backing_filesystem, str) and status.backing_filesystem
    with driver.mounted("child"):
        assert driver.status().mounted == 1
    assert isinstance(status.as_dict(), dict)


def test_cleanup_idempotent(gd_case: Case) -> None:
    """cleanup() unmounts what is mounted, may be called twice, and keeps every layer."""
    from graphdrivers.fsutil.fstype import mounts_under

    driver = gd_case.open()
    make_layer(driver, "base", None, lambda r: write(r, "f", b"data"))
    driver.create("child", "base")
    expected = tree(driver, "child")
    driver.get("child")
    driver.get("base")

    driver.cleanup()
    driver.cleanup()
    assert mounts_under(gd_case.home) == [], mounts_under(gd_case.home)

    again = gd_case.open()
    assert sorted(again.list_layers()) == ["base", "child"]
    assert_same_tree(expected, tree(again, "child"), "child after cleanup and reopen")


def test_reopen_keeps_layers(gd_case: Case) -> None:
    """A second driver on the same home sees the same layers with the same content."""
    driver = gd_case.open()
    create_base(driver, "base")
    make_layer(driver, "child", "base", lambda r: write(r, "new", b"x" * 100))
    expected = {lid: tree(driver, lid, mtimes=True) for lid in ("base", "child")}
    order = driver.list_layers()
    driver.cleanup()

    again = gd_case.open()
    assert again.list_layers() == order
    assert again.parent("child") == "base"
    for lid, want in expected.items():
        assert_same_tree(want, tree(again, lid, mtimes=True), f"{lid} after reopen")
