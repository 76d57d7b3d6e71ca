"""Real OCI images (/work/shared/images): our layer stack equals umoci's, and re-diffs round-trip.

For each image, the layers are applied one by one with apply_layer ("delete" whiteouts), and
the result is compared with what ``umoci unpack`` (an independent implementation) makes of the
same image. Then every layer is re-derived: changes_dirs between consecutive states, exported,
and applied onto a copy of the earlier state, which must give the later state again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from archive_helpers import manifest

from graphdrivers.archive import apply_layer, changes_dirs, changes_size, export_changes
from graphdrivers.driver import Kind

IMAGES = Path("/work/shared/images")


def layer_blobs(image: Path) -> list[Path]:
    index = json.loads((image / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    image_manifest = json.loads((image / "blobs" / "sha256" / digest).read_text())
    return [
        image / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        for layer in image_manifest["layers"]
    ]


def link_copy(src: Path, dst: Path) -> None:
    """A cheap snapshot: new directories, files hardlinked (GNU cp -al).

    apply_layer never changes a non-directory in place (it replaces it), so applying onto the
    copy leaves the original as it was, as a snapshot should.
    """
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def umoci_rootfs(image: Path, tag: str, work: Path) -> Path:
    copy = work / "image-copy"
    shutil.copytree(image, copy)
    subprocess.run(
        ["umoci", "unpack", "--image", f"{copy}:{tag}", str(work / "bundle")],
        check=True,
        capture_output=True,
    )
    return work / "bundle" / "rootfs"


def stack_and_rediff(image: Path, tag: str, work: Path) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("missing tool umoci (Debian package umoci)")
    if not image.is_dir():
        pytest.skip(f"missing test image {image}")

    states = []
    root = work / "ours"
    root.mkdir()
    for n, blob in enumerate(layer_blobs(image)):
        with open(blob, "rb") as f:
            apply_layer(root, f)
        state = work / f"state{n}"
        link_copy(root, state)
        states.append(state)

    reference = umoci_rootfs(image, tag, work)
    assert manifest(root, dir_times=False) == manifest(reference, dir_times=False)

    previous = work / "empty"
    previous.mkdir()
    for state in states:
        changes = changes_dirs(state, previous)
        target = work / "replay"
        link_copy(previous, target)
        size = apply_layer(target, io.BytesIO(b"".join(export_changes(state, changes))))
        assert size == changes_size(state, changes)
        # A directory whose only change is its mtime is not a change (moby's rule), so
        # directory times are compared for the directories the diff carries.
        assert manifest(target, dir_times=False) == manifest(state, dir_times=False)
        for change in changes:
            path = change.path.lstrip("/")
            if change.kind is not Kind.DELETE and (state / path).is_dir():
                assert os.lstat(target / path).st_mtime_ns == os.lstat(state / path).st_mtime_ns
        shutil.rmtree(target)
        previous = state


def test_busybox_image(tmp_path: Path) -> None:
    stack_and_rediff(IMAGES / "busybox", "1", tmp_path)


@pytest.mark.slow
def test_debian_minbase_image(tmp_path: Path) -> None:
    stack_and_rediff(IMAGES / "debian-minbase", "bookworm", tmp_path)
