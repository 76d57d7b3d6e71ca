"""Every script in examples/ runs, as a user would run it, and does what its docstring says.

Examples are found by listing the directory, so a new one is run without editing this file.
The convention they all follow: standalone, argparse, a module docstring, ``--home DIR`` for
the driver home, ``--driver NAME``, and any output written relative to the working directory
(here a temp dir).
An example without a checker below is held to exit 0, a docstring and some output; the known
ones are checked against what they claim to produce.
"""

from __future__ import annotations

import ast
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from graphdrivers import open_driver
from graphdrivers.image import import_image, open_image

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
BUSYBOX = REPO.parent / "shared" / "images" / "busybox"

pytestmark = pytest.mark.skipif(not BUSYBOX.is_dir(), reason=f"missing test image {BUSYBOX}")


def run_example(example: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(example), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def layer_tar_paths(blob: Path) -> set[str]:
    """The distinct paths a gzip layer blob holds, without the root."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.read_bytes()))) as tar:
        names = {os.path.normpath(m.name).lstrip("/") for m in tar.getmembers()}
    return names - {"."}


def check_stack_image(out: str, work: Path) -> None:
    with open_image(BUSYBOX, tag="1") as image:
        first = layer_tar_paths(BUSYBOX / image.layers[0].name)
    assert "3 layers" in out
    assert f"layer 1 330fd54f9f51: {len(first)} added, 0 changed, 0 deleted" in out
    assert "/etc/passwd: root:x:0:0:root" in out
    assert "removed the layers again" in out
    assert open_driver("vfs", work / "home").list_layers() == []


def check_build_layers(out: str, work: Path) -> None:
    assert "A /etc/motd" in out and "C /etc/passwd" in out and "D /tmp" in out
    if shutil.which("umoci"):
        assert "umoci unpack: the steps are all there" in out

    driver = open_driver("vfs", work / "reimport")
    try:
        top = import_image(driver, work / "built-image", tag="built")[-1]
        with driver.mounted(top) as root:
            run, start = root / "srv/app/run.sh", root / "srv/app/start.sh"
            assert (root / "etc/motd").read_text() == "built by examples/build_layers.py\n"
            assert run.stat().st_mode & 0o777 == 0o755
            assert run.stat().st_ino == start.stat().st_ino
            assert os.getxattr(run, "user.origin") == b"build_layers"
            assert (root / "etc/passwd").stat().st_mode & 0o777 == 0o600
            assert (root / "srv/app/VERSION").read_text() == "1.0\n"
            assert not (root / "tmp").exists() and not (root / "var/log").exists()
            assert (root / "bin/busybox").is_file()  # the base is still under the steps
    finally:
        driver.cleanup()


def check_diff_and_apply(out: str, work: Path) -> None:
    assert "the same changes on both sides" in out
    with tarfile.open(work / "change.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"etc/greeting", "etc/hostname", "bin/.wh.rm"} <= names


def check_generic(out: str, work: Path) -> None:
    assert out.strip(), "the example printed nothing"


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "stack_image.py": check_stack_image,
    "build_layers.py": check_build_layers,
    "diff_and_apply.py": check_diff_and_apply,
}


def test_the_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES} >= set(CHECKS)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_does_what_it_says(example: Path, tmp_path: Path) -> None:
    run = run_example(example, tmp_path, "--home", str(tmp_path / "home"))
    assert run.returncode == 0, f"{example.name} failed:\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr
    CHECKS.get(example.name, check_generic)(run.stdout, tmp_path)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_explains_itself_and_takes_help(example: Path, tmp_path: Path) -> None:
    doc = ast.get_docstring(ast.parse(example.read_text()))
    assert doc and len(doc.splitlines()) > 3, f"{example.name} needs a docstring saying what"
    run = run_example(example, tmp_path, "--help")
    assert run.returncode == 0 and "--home" in run.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_errors_are_one_line_without_traceback(example: Path, tmp_path: Path) -> None:
    # A driver that does not exist: the example must say so in one line and exit non-zero.
    run = run_example(example, tmp_path, "--home", str(tmp_path / "h"), "--driver", "nope")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "nope" in run.stderr
