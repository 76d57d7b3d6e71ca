"""The command line, run as a real subprocess against vfs in a temporary home.

Every error path is checked for its documented exit code and for the one-line message on
stderr (no traceback unless -v).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pty
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from graphdrivers.cli import common

BUSYBOX = Path("/work/shared/images/busybox")
CONSOLE_SCRIPT = Path(sys.executable).with_name("graphdrivers")


class Cli:
    """Runs ``python -m graphdrivers --home HOME ...`` and keeps the result."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def __call__(
        self, *args: str, input: bytes | None = None, home: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "graphdrivers"]
        if home:
            cmd += ["--home", str(self.home)]
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [*cmd, *args], input=input, capture_output=True, timeout=120, **kw
        )

    def ok(self, *args: str, input: bytes | None = None) -> str:
        proc = self(*args, input=input)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    def fails(self, code: int, *args: str, input: bytes | None = None) -> str:
        """Run a verb that must fail with ``code`` and a single error line; return it."""
        proc = self(*args, input=input)
        err = proc.stderr.decode()
        assert proc.returncode == code, (proc.returncode, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphdrivers: error: "), err
        assert "Traceback" not in err
        return lines[0]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


def make_tar(entries: dict[str, bytes | None]) -> bytes:
    """A layer tar written with tarfile: name -> content (None for a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE_TAR = {
    "etc": None,
    "etc/hostname": b"base\n",
    "etc/keep": b"keep\n",
    "data": None,
    "data/old.txt": b"old\n",
}


@pytest.fixture
def stacked(cli: Cli, tmp_path: Path) -> Path:
    """A base applied from a tar, and a rw child changed through its mountpoint."""
    tar = tmp_path / "base.tar"
    tar.write_bytes(make_tar(BASE_TAR))
    cli.ok("apply", "base", str(tar))
    cli.ok("create", "child", "--parent", "base", "--rw")
    root = Path(cli.ok("mount", "child").strip())
    (root / "etc" / "hostname").write_text("child\n")
    (root / "data" / "old.txt").unlink()
    (root / "new.txt").write_text("new\n")
    cli.ok("umount", "child")
    return root


# --------------------------------------------------------------------------- entry points


def test_module_and_console_script_run() -> None:
    for cmd in ([sys.executable, "-m", "graphdrivers", "--help"], [str(CONSOLE_SCRIPT), "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "compare" in proc.stdout and "doctor" in proc.stdout


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert cli().returncode == 2  # no verb
    assert cli("create").returncode == 2  # no id
    assert cli("frobnicate").returncode == 2


# --------------------------------------------------------------------------- layer lifecycle


def test_create_ls_and_json(cli: Cli) -> None:
    assert cli.ok("create", "base").splitlines()[-1] == "base"
    assert cli.ok("create", "mid", "--parent", "base").splitlines()[-1] == "mid"
    cli.ok("create", "top", "--parent", "mid", "--rw")

    rows = [line.split() for line in cli.ok("ls").splitlines()]
    assert rows == [["top", "mid"], ["mid", "base"], ["base", "-"]]
    data = json.loads(cli.ok("ls", "--json"))
    assert [(r["id"], r["parent"], r["mounted"]) for r in data] == [
        ("top", "mid", False),
        ("mid", "base", False),
        ("base", None, False),
    ]
    assert data[0]["metadata"]["Parent"] == "mid"


def test_global_options_also_after_the_verb(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other"
    proc = cli("create", "x", "--home", str(other), home=False)
    assert proc.returncode == 0, proc.stderr
    assert cli.ok("ls") == ""
    proc = cli("ls", "--home", str(other), home=False)
    assert proc.stdout.decode().split() == ["x", "-"]


def test_mount_prints_a_lasting_path_and_umount_releases(cli: Cli) -> None:
    cli.ok("create", "l1", "--rw")
    path = Path(cli.ok("mount", "l1").strip())
    assert path.is_dir()
    assert cli.ok("get", "l1").strip() == str(path)  # alias, and the recorded path again
    assert json.loads(cli.ok("ls", "--json"))[0]["mounted"] is True
    assert json.loads(cli.ok("status", "--json"))["cli_mounts"] == ["l1"]

    msg = cli.fails(5, "rm", "l1")
    assert "umount" in msg
    cli.ok("put", "l1")
    cli.fails(5, "umount", "l1")  # NotMounted
    cli.ok("rm", "l1")
    assert cli.ok("ls") == ""


# Drivers whose mounts are real mounts; by spec until they join the registry.
MOUNTING_DRIVERS = {
    "union": "graphdrivers.drivers.union:UnionDriver",
    "overlay": "graphdrivers.drivers.overlay:OverlayDriver",
}


@pytest.mark.parametrize("name", sorted(MOUNTING_DRIVERS))
def test_a_real_mount_outlives_the_command_until_umount(cli: Cli, name: str) -> None:
    from graphdrivers.fsutil.fstype import mounts_under
    from graphdrivers.registry import driver_names

    spec = name if name in driver_names() else MOUNTING_DRIVERS[name]
    drv = ("--driver", spec)
    try:
        cli.ok(*drv, "create", "base", "--rw")
        root = Path(cli.ok(*drv, "mount", "base").strip())
        assert [m.target for m in mounts_under(root)] == [root]
        (root / "file").write_text("kept\n")

        cli.ok(*drv, "ls")  # another command must leave the mount alone
        assert [m.target for m in mounts_under(root)] == [root]
        cli.fails(5, *drv, "rm", "base")

        cli.ok(*drv, "umount", "base")
        assert mounts_under(root) == []
        cli.ok(*drv, "create", "kid", "--parent", "base")
        assert cli.ok(*drv, "changes", "kid", "--full").splitlines() == ["A /file"]
        cli.ok(*drv, "rm", "kid")
        cli.ok(*drv, "rm", "base")
    finally:
        for entry in mounts_under(cli.home):  # a failed assertion must not leave a mount
            subprocess.run(["umount", "-l", str(entry.target)], check=False)
    assert mounts_under(cli.home) == []


def test_error_exit_codes_and_one_line_messages(cli: Cli) -> None:
    cli.ok("create", "base")
    cli.ok("create", "kid", "--parent", "base")

    assert "already exists" in cli.fails(4, "create", "base")
    assert "parent layer 'nope'" in cli.fails(3, "create", "x", "--parent", "nope")
    assert "does not exist" in cli.fails(3, "rm", "nope")
    cli.ok("rm", "nope", "--missing-ok")
    assert "parent of kid" in cli.fails(5, "rm", "base")
    assert "invalid layer id" in cli.fails(8, "create", "../evil")
    assert "reserved" in cli.fails(8, "create", "layers")
    assert "storage option" in cli.fails(8, "create", "y", "--storage-opt", "nosuch=1")
    assert "key=value" in cli.fails(8, "create", "y", "--storage-opt", "novalue")
    assert "unknown driver option" in cli.fails(8, "-o", "nosuch=1", "ls")
    assert "unknown driver" in cli.fails(8, "--driver", "nosuch", "ls")
    assert "does not exist" in cli.fails(3, "mount", "nope")
    assert "does not exist" in cli.fails(3, "changes", "nope")
    cli.fails(5, "umount", "base")

    verbose = cli("-v", "create", "base")
    assert verbose.returncode == 4 and b"Traceback" in verbose.stderr


def test_status_is_structured(cli: Cli) -> None:
    cli.ok("create", "a")
    data = json.loads(cli.ok("status", "--json"))
    assert data["driver"] == "vfs" and data["layers"] == 1
    assert data["home"] == str(cli.home) and data["backing_filesystem"]
    text = cli.ok("status")
    assert "driver: vfs" in text and "layers: 1" in text


# --------------------------------------------------------------------------- the diff side


def test_changes_lists_what_the_child_did(cli: Cli, stacked: Path) -> None:
    lines = cli.ok("changes", "child").splitlines()
    assert lines == ["C /data", "D /data/old.txt", "C /etc", "C /etc/hostname", "A /new.txt"]
    data = json.loads(cli.ok("changes", "child", "--json"))
    assert {"path": "/new.txt", "kind": "add"} in data
    assert {"path": "/data/old.txt", "kind": "delete"} in data
    full = cli.ok("changes", "child", "--full").splitlines()
    assert all(line.startswith("A ") for line in full) and "A /etc/keep" in full


def test_diff_writes_a_layer_tar_and_apply_reproduces_it(
    cli: Cli, stacked: Path, tmp_path: Path
) -> None:
    out = tmp_path / "child.tar"
    cli.ok("diff", "child", "-o", str(out))
    with tarfile.open(out) as tar:
        names = {m.name.rstrip("/") for m in tar}
    assert {"new.txt", "etc/hostname", "data/.wh.old.txt"} <= names
    assert "etc/keep" not in names

    piped = cli("diff", "child")  # stdout is a pipe here: allowed
    assert piped.returncode == 0 and piped.stdout == out.read_bytes()  # deterministic
    gz = cli("diff", "child", "--compress", "gzip")
    assert gzip.decompress(gz.stdout) == out.read_bytes()

    size = int(cli.ok("apply", "copy", "--parent", "base", str(out)).strip())
    assert size == len(b"child\n") + len(b"new\n")
    assert cli.ok("changes", "copy").splitlines() == cli.ok("changes", "child").splitlines()
    root = Path(cli.ok("mount", "copy", "--readonly").strip())
    assert (root / "etc" / "hostname").read_text() == "child\n"
    assert not (root / "data" / "old.txt").exists()
    cli.ok("umount", "copy")

    again = int(
        cli.ok("apply", "from-stdin", "--parent", "base", "-", input=out.read_bytes()).strip()
    )
    assert again == size


def test_diff_refuses_a_terminal(cli: Cli, stacked: Path) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "graphdrivers", "--home", str(cli.home), "diff", "child"],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("graphdrivers: error: refusing to write")


def test_progress_bar_only_when_stdout_is_a_terminal(cli: Cli, tmp_path: Path) -> None:
    tar = tmp_path / "big.tar"
    tar.write_bytes(make_tar({f"f{i}": bytes(4096) for i in range(50)}))
    quiet = cli("apply", "piped", str(tar))
    assert quiet.returncode == 0 and quiet.stderr == b""

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "graphdrivers",
                "--home",
                str(cli.home),
                "apply",
                "tty",
                str(tar),
            ],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        printed = os.read(leader, 1000)
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    assert b"\rapply tty [" in proc.stderr and b"%" in proc.stderr
    assert printed.strip() == str(50 * 4096).encode()


def test_apply_of_garbage_exits_6_and_leaves_no_layer(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(make_tar({"ok.txt": b"x"})[:700] + b"\xff" * 300)
    cli.fails(6, "apply", "broken", str(bad))
    evil = tmp_path / "evil.tar"
    evil.write_bytes(make_tar({"../escape.txt": b"x"}))
    cli.fails(6, "apply", "evil", str(evil))
    assert cli.ok("ls") == ""
    assert not (tmp_path / "escape.txt").exists()


# --------------------------------------------------------------------------- images


@pytest.mark.skipif(not BUSYBOX.is_dir(), reason=f"needs the test image {BUSYBOX}")
def test_import_busybox_then_export_and_reimport(cli: Cli, tmp_path: Path) -> None:
    index = json.loads((BUSYBOX / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((BUSYBOX / "blobs" / "sha256" / digest).read_text())
    layer_count = len(manifest["layers"])

    ids = cli.ok("import", f"{BUSYBOX}:1").split()
    assert len(ids) == layer_count == 3
    assert [r.split()[0] for r in cli.ok("ls").splitlines()] == list(reversed(ids))
    root = Path(cli.ok("mount", ids[-1], "--readonly").strip())
    assert (root / "bin" / "busybox").is_file()
    cli.ok("umount", ids[-1])

    dest = tmp_path / "exported"
    assert cli.ok("export", ids[-1], str(dest), "--tag", "again").strip() == str(dest)
    assert (dest / "index.json").is_file()
    other = Cli(tmp_path / "home2")
    assert len(other.ok("import", f"{dest}:again").split()) == layer_count


def test_import_of_a_missing_source_fails_cleanly(cli: Cli, tmp_path: Path) -> None:
    proc = cli("import", str(tmp_path / "nothing-here"))
    assert proc.returncode != 0
    assert proc.stderr.decode().count("\n") == 1 and b"Traceback" not in proc.stderr


# --------------------------------------------------------------------------- doctor, conformance


def test_doctor_names_vfs_available(cli: Cli) -> None:
    reports = json.loads(cli.ok("doctor", "--json"))
    by_name = {r["driver"]: r for r in reports}
    assert by_name["vfs"]["available"] is True and by_name["vfs"]["registered"] is True
    for planned in ("union", "overlay", "btrfs", "devicemapper"):
        assert planned in by_name
    text = cli.ok("doctor")
    assert any(line.split()[:2] == ["vfs", "available"] for line in text.splitlines())


def test_doctor_explains_a_home_on_the_wrong_filesystem(cli: Cli, tmp_path: Path) -> None:
    reports = json.loads(cli.ok("--home", str(tmp_path), "doctor", "--json"))
    btrfs = next(r for r in reports if r["driver"] == "btrfs")
    if btrfs["backing_filesystem"] == "btrfs":
        pytest.skip("the temporary directory is on btrfs")
    assert btrfs["available"] is False
    assert any("backing filesystem btrfs" in m for m in btrfs["missing"])
    assert any("mkfs.btrfs" in h or "--home" in h for h in btrfs["hints"])


HOOKED_DRIVER = """
import contextlib, pathlib, tempfile
from graphdrivers.drivers.vfs import VfsDriver

LOG = pathlib.Path(__file__).with_name("hook.log")


class ForgetfulVfs(VfsDriver):
    name = "forgetful"

    def changes(self, layer_id, parent=None):
        return []  # breaks the contract: the suite must notice


@contextlib.contextmanager
def conformance_home():
    with tempfile.TemporaryDirectory() as root:
        LOG.write_text("entered " + root + "\\n")
        yield pathlib.Path(root)
    with LOG.open("a") as f:
        f.write("exited\\n")
"""


def test_conformance_runs_the_suite_and_passes_pytest_status(cli: Cli, tmp_path: Path) -> None:
    proc = cli(
        "conformance",
        "vfs",
        "--home",
        str(tmp_path / "homes"),
        "--",
        "-q",
        "-k",
        "changes_exact",
        home=False,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    assert b"1 passed" in proc.stdout

    (tmp_path / "hooked.py").write_text(HOOKED_DRIVER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    proc = cli(
        "conformance",
        "hooked:ForgetfulVfs",
        "--",
        "-q",
        "-k",
        "changes_exact",
        env=env,
        home=False,
    )
    assert proc.returncode == 1, proc.stdout.decode()[-2000:]  # pytest: tests failed
    assert b"1 failed" in proc.stdout
    log = (tmp_path / "hook.log").read_text().split()
    assert log[0] == "entered" and log[-1] == "exited"  # the module's homes were used

    assert "unknown driver" in cli.fails(8, "conformance", "nosuch")


def test_exit_code_table_matches_the_docs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for code in (
        common.EXIT_OK,
        common.EXIT_ERROR,
        common.EXIT_USAGE,
        common.EXIT_NOT_FOUND,
        common.EXIT_EXISTS,
        common.EXIT_BUSY,
        common.EXIT_ARCHIVE,
        common.EXIT_NOT_SUPPORTED,
        common.EXIT_INVALID,
        common.EXIT_INTERRUPTED,
    ):
        assert f"| {code} " in doc
    for kind, code in common.EXIT_CODES:
        row = next(line for line in doc.splitlines() if line.startswith(f"| {code} "))
        assert kind.__name__ in row or kind.__name__ == "DriverError"
