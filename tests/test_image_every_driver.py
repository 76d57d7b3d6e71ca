"""Every built-in driver stacks the shared real images exactly as ``umoci unpack`` does.

tests/test_image.py checks the image code itself on vfs; this module holds each driver to the
same reference: import an image as a chain of layers, mount the top, and compare the tree
with umoci's unpack of the same image in every path, type, mode, owner, size, content, link
target, hardlink group and xattr. Then the top layer's diff is applied onto a copy of its
parent in a fresh vfs home and must give the same tree again: what one driver writes out,
another reads back.

A driver module that wants its homes on a particular filesystem (btrfs) exposes
``conformance_home()``; it is used here too.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_image import BUSYBOX, DEBIAN, assert_same_tree, needs_images, needs_umoci, umoci_unpack

from graphdrivers import open_driver
from graphdrivers.cli.conformance import find_home_hook
from graphdrivers.driver import Driver
from graphdrivers.errors import NotSupported
from graphdrivers.image import import_image
from graphdrivers.registry import driver_names

pytestmark = [needs_images, needs_umoci]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """umoci's unpack of each image, made once for the module."""
    base = tmp_path_factory.mktemp("umoci")
    yield {
        "busybox": umoci_unpack(f"{BUSYBOX}:1", base / "busybox"),
        "debian": umoci_unpack(f"{DEBIAN}:bookworm", base / "debian"),
    }
    shutil.rmtree(base, ignore_errors=True)


# Pool sizes that fit any test machine (the 100G sparse default warns where disks are smaller).
OPTIONS = {"devicemapper": {"dm.loopdatasize": "8G", "dm.loopmetadatasize": "64M"}}


@pytest.fixture(params=driver_names())
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """A fresh home of each built-in driver, where its module wants homes to be."""
    name = request.param
    hook = find_home_hook(name)
    with hook() if hook is not None else contextlib.nullcontext() as root:
        home = Path(root if root is not None else tmp_path) / f"{name}-home"
        try:
            opened = open_driver(name, home, OPTIONS.get(name))
        except NotSupported as exc:
            pytest.skip(f"{name} is not supported here: {exc}")
        try:
            yield opened
        finally:
            opened.cleanup()
            shutil.rmtree(home, ignore_errors=True)


def stacked_equals_reference(driver: Driver, image_ref: str, want: Path, tmp_path: Path) -> None:
    """Import, compare the top with ``want``, then carry the top's diff over to vfs."""
    ids = import_image(driver, image_ref)
    assert [driver.parent(i) for i in ids] == [None, *ids[:-1]]
    with driver.mounted(ids[-1], readonly=True) as root:
        assert_same_tree(Path(root), want)

    # The top layer's diff, applied over the same parents elsewhere, gives the same tree.
    other = open_driver("vfs", tmp_path / "carried")
    try:
        parent = None
        for layer in ids:
            with driver.diff(layer, parent) as stream:
                other.apply_diff(layer, parent, stream)
            parent = layer
        with other.mounted(ids[-1], readonly=True) as root:
            assert_same_tree(Path(root), want)
    finally:
        other.cleanup()


def test_busybox(driver: Driver, reference: dict[str, Path], tmp_path: Path) -> None:
    stacked_equals_reference(driver, f"{BUSYBOX}:1", reference["busybox"], tmp_path)


@pytest.mark.slow
def test_debian_minbase(driver: Driver, reference: dict[str, Path], tmp_path: Path) -> None:
    stacked_equals_reference(driver, f"{DEBIAN}:bookworm", reference["debian"], tmp_path)
