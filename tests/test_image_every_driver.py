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
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdrivers import open_driver
from graphdrivers.cli.conformance import find_home_hook
from graphdrivers.conformance.manifest import diff_manifests, manifest
from graphdrivers.driver import Driver
from graphdrivers.errors import NotSupported
from graphdrivers.image import import_image
from graphdrivers.registry import driver_names

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"
BUSYBOX = IMAGES / "busybox"
DEBIAN = IMAGES / "debian-minbase"
UMOCI = shutil.which("umoci")

pytestmark = [
    pytest.mark.skipif(not BUSYBOX.is_dir(), reason=f"missing test images {IMAGES}"),
    pytest.mark.skipif(UMOCI is None, reason="missing tool umoci (Debian package umoci)"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """umoci's unpack of each image, made once for the module."""
    base = tmp_path_factory.mktemp("umoci")
    trees = {}
    for name, ref in (("busybox", f"{BUSYBOX}:1"), ("debian", f"{DEBIAN}:bookworm")):
        bundle = base / name
        run = subprocess.run(
            [str(UMOCI), "unpack", "--image", ref, str(bundle)], capture_output=True, text=True
        )
        assert run.returncode == 0, f"umoci unpack {ref}: {run.stderr}"
        trees[name] = bundle / "rootfs"
    yield trees
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


def assert_same_tree(want: Path, got: Path) -> None:
    lines = diff_manifests(manifest(want), manifest(got))
    if lines:
        shown = "\n".join(lines[:60])
        pytest.fail(
            f"{len(lines)} entries of {got} differ from {want} (expected -> got):\n{shown}"
        )


def stacked_equals_reference(driver: Driver, image_ref: str, want: Path, tmp_path: Path) -> None:
    """Import, compare the top with ``want``, then carry the top's diff over to vfs."""
    ids = import_image(driver, image_ref)
    assert [driver.parent(i) for i in ids] == [None, *ids[:-1]]
    with driver.mounted(ids[-1], readonly=True) as root:
        assert_same_tree(want, Path(root))

    # The top layer's diff, applied over the same parents elsewhere, gives the same tree.
    other = open_driver("vfs", tmp_path / "carried")
    try:
        parent = None
        for layer in ids:
            with driver.diff(layer, parent) as stream:
                other.apply_diff(layer, parent, stream)
            parent = layer
        with other.mounted(ids[-1], readonly=True) as root:
            assert_same_tree(want, Path(root))
    finally:
        other.cleanup()


def test_busybox(driver: Driver, reference: dict[str, Path], tmp_path: Path) -> None:
    stacked_equals_reference(driver, f"{BUSYBOX}:1", reference["busybox"], tmp_path)


@pytest.mark.slow
def test_debian_minbase(driver: Driver, reference: dict[str, Path], tmp_path: Path) -> None:
    stacked_equals_reference(driver, f"{DEBIAN}:bookworm", reference["debian"], tmp_path)
