"""``graphdrivers compare``: a row per driver, numbers that match the workload, no leftovers.

The expected read size and file count come from the workload's layer models (what stacking
them must give), not from any driver; the run happens in a subprocess whose temporary
directory is the test's, so leftovers would be visible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphdrivers import workload
from graphdrivers.fsutil.fstype import mounts_under
from graphdrivers.registry import driver_names

FILES = 400  # a small base keeps this quick for every driver
BUSYBOX = Path("/work/shared/images/busybox")


def compare(tmp: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.run(
        [sys.executable, "-m", "graphdrivers", "compare", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def assert_nothing_left(tmp: Path) -> None:
    assert mounts_under(tmp) == []
    assert sorted(os.listdir(tmp)) == []


@pytest.mark.slow
def test_every_driver_gets_a_row_with_the_workload_numbers(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = compare(scratch, "--no-conformance", "--json", "--files", str(FILES))
    assert proc.returncode == 0, proc.stderr

    wl = workload.build(files=FILES)
    data = json.loads(proc.stdout)
    assert data["stack"]["expected_bytes"] == wl.total_file_bytes()
    rows = {r["driver"]: r for r in data["drivers"]}
    assert list(rows) == driver_names()
    assert rows["vfs"]["status"] == "ok"

    top_layer_bytes = sum(n.size for n in wl.layers[-1].entries.values())
    for name, row in rows.items():
        if not row["available"]:
            assert row["status"].startswith("not available: ") and row["missing"], row
            continue
        assert row["status"] == "ok", (name, row["status"])
        assert row["layers"] == len(wl.layers)
        assert row["read_bytes"] == wl.total_file_bytes(), name
        assert row["read_files"] == wl.file_count(), name
        for key in ("apply_s", "create_s", "mount_s", "read_s", "diff_s"):
            assert 0 <= row[key] < 120, (name, key, row[key])
        assert row["diff_bytes"] > top_layer_bytes  # the tar holds at least the layer's data
        sparse_hole = workload.SPARSE_SIZE
        assert row["disk_bytes"] >= wl.total_file_bytes() - sparse_hole, name
        assert row["conformance"] is None
    assert_nothing_left(scratch)


def test_text_table_has_a_line_per_driver(tmp_path: Path) -> None:
    proc = compare(tmp_path, "--no-conformance", "--drivers", "vfs", "--files", "200")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("stack: workload seed")
    assert lines[1].split()[:3] == ["driver", "apply", "create"]
    vfs = lines[2].split()
    assert vfs[0] == "vfs" and all(v.endswith("s") for v in vfs[1:5])
    assert len(lines) == 3
    assert_nothing_left(tmp_path)


def test_unknown_driver_is_an_invalid_option(tmp_path: Path) -> None:
    proc = compare(tmp_path, "--no-conformance", "--drivers", "vfs,nosuch")
    assert proc.returncode == 8
    assert proc.stderr.startswith("graphdrivers: error: unknown driver(s) nosuch")


def test_a_driver_that_cannot_run_is_shown_with_what_is_missing(tmp_path: Path) -> None:
    # A real driver class with a real host requirement this host lacks: kernel filesystem
    # "nosuchfs" (the factory below is plain code, not a mock of a component).
    module = tmp_path / "lackingdriver.py"
    module.write_text(
        "from graphdrivers.drivers.vfs import VfsDriver\n"
        "from graphdrivers import hostcheck\n"
        "from graphdrivers.errors import NotSupported\n"
        "class Lacking(VfsDriver):\n"
        "    name = 'lacking'\n"
        "    def _check_host(self):\n"
        "        check = hostcheck.kernel_filesystem('nosuchfs')\n"
        "        if not check.ok:\n"
        "            raise NotSupported(check.what, hint=check.hint, driver=self.name)\n"
    )
    env = dict(
        os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphdrivers",
            "compare",
            "--no-conformance",
            "--json",
            "--files",
            "100",
            "--drivers",
            "lackingdriver:Lacking,vfs",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["drivers"]
    assert rows[0]["status"] == "not available: kernel filesystem nosuchfs"
    assert rows[0]["available"] is False and "CONFIG_NOSUCHFS_FS" in rows[0]["hint"]
    assert rows[1]["status"] == "ok"
    os.unlink(module)
    assert_nothing_left(tmp_path)


def test_ctrl_c_cleans_up_every_home(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphdrivers", "compare", "--no-conformance", "--drivers", "vfs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        layers: list[Path] = []
        while time.monotonic() < deadline and not layers and proc.poll() is None:
            layers = list(tmp_path.glob("graphdrivers-compare-vfs-*/home/layers/*.json"))
        assert layers, "compare never created a layer"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "graphdrivers: error: interrupted"
    assert_nothing_left(tmp_path)


@pytest.mark.skipif(not BUSYBOX.is_dir(), reason=f"needs the test image {BUSYBOX}")
@pytest.mark.skipif(shutil.which("umoci") is None, reason="needs tool umoci (Debian umoci)")
def test_image_stack(tmp_path: Path) -> None:
    proc = compare(
        tmp_path, "--no-conformance", "--json", "--drivers", "vfs", "--image", f"{BUSYBOX}:1"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    row = data["drivers"][0]
    assert data["stack"]["description"] == f"image {BUSYBOX}:1"
    assert row["status"] == "ok" and row["layers"] == 3
    assert_nothing_left(tmp_path)

    # umoci stacks the same image independently: the same files must have been read.
    image = tmp_path / "image"
    shutil.copytree(BUSYBOX, image)
    subprocess.run(
        ["umoci", "unpack", "--image", f"{image}:1", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    sizes = [
        p.lstat().st_size
        for p in (tmp_path / "bundle" / "rootfs").rglob("*")
        if stat.S_ISREG(p.lstat().st_mode)
    ]
    assert (row["read_files"], row["read_bytes"]) == (len(sizes), sum(sizes))


@pytest.mark.slow
def test_conformance_counts_for_vfs(tmp_path: Path) -> None:
    proc = compare(tmp_path, "--json", "--drivers", "vfs", "--files", "100")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)["drivers"][0]["conformance"]
    assert verdict["exit_code"] == 0 and verdict["failed"] == 0 and verdict["errors"] == 0
    assert verdict["passed"] > 50
