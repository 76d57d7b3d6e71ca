"""kill -9 in the middle of create, apply_diff and remove; two processes on one home.

A worker process (:mod:`graphdrivers.conformance.worker`) opens the driver on the check's home
from its registry spec and starts the operation. The test watches the layer's store record
(:class:`graphdrivers.store.LayerStore`) and sends SIGKILL as soon as the record shows the
operation under way (``creating``, ``applying``, ``removing``). An apply is fed through a pipe
and held half-way, so the kill lands with part of the tar unpacked. Then a driver is opened on
the home in this process, which must find every layer whole (the same tree as before) or absent,
list only complete layers, and accept the id again.

These checks need the driver as a spec string and a driver built on
:class:`graphdrivers.driver.Driver` (whose store records they watch); otherwise they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from graphdrivers.conformance.fixtures import Case
from graphdrivers.conformance.helpers import apply_bytes, make_layer, read_diff, tree, write
from graphdrivers.conformance.manifest import Manifest, assert_same_tree

# Size of the trees that make create and remove take long enough to be caught under way.
BIG_TREE_DIRS = 20
BIG_TREE_FILES = 100
BIG_FILE_SIZE = 2048

# How long a worker may take to reach the state the test waits for.
OBSERVE_TIMEOUT = 60.0


def _require_spec(case: Case, driver: Any) -> str:
    from graphdrivers.driver import Driver

    if case.target.spec is None:
        pytest.skip(
            "a driver spec string (the crash checks open the driver in a subprocess; "
            "a factory callable cannot be passed there)"
        )
    if not isinstance(driver, Driver):
        pytest.skip("a graphdrivers.driver.Driver subclass (the crash checks watch its store)")
    return case.target.spec


def _big_tree(root: Path) -> None:
    for d in range(BIG_TREE_DIRS):
        for f in range(BIG_TREE_FILES):
            write(root, f"d{d}/f{f}", bytes([d, f]) * (BIG_FILE_SIZE // 2))


def _spawn(case: Case, spec: str, job: dict[str, Any], stdin: int | None = None) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    job = {"spec": spec, "home": os.fspath(case.home), "options": dict(case.target.options), **job}
    return subprocess.Popen(
        [sys.executable, "-m", "graphdrivers.conformance.worker", json.dumps(job)],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _kill_when(proc: Any, home: Path, layer_id: str, state: str) -> bool:
    """SIGKILL ``proc`` once the record of ``layer_id`` is in ``state``.

    Returns False if the process finished first (the operation was too fast to catch).
    """
    from graphdrivers.ids import LayerId
    from graphdrivers.store import LayerStore

    store = LayerStore(home)
    deadline = time.monotonic() + OBSERVE_TIMEOUT
    while time.monotonic() < deadline:
        record = store.get(LayerId(layer_id))
        if record is not None and record.state.value == state:
            proc.kill()
            proc.wait()
            return True
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0, f"worker failed: {err.decode(errors='replace')}"
            return False
    proc.kill()
    proc.wait()
    raise AssertionError(f"layer {layer_id} never reached {state!r} in {OBSERVE_TIMEOUT}s")


def _check_after_crash(case: Case, expected: dict[str, Manifest], crashed: str) -> Any:
    """Reopen the home: each layer whole or absent, the listing complete and consistent."""
    driver = case.open()
    layers = driver.list_layers()
    for lid in layers:
        parent = driver.parent(lid)
        assert parent is None or parent in layers, f"{lid} listed, its parent {parent} not"
        assert lid in expected, f"unexpected layer {lid} after the crash: {layers}"
        assert_same_tree(expected[lid], tree(driver, lid), f"layer {lid} after the crash")
    for lid in expected:
        if lid != crashed:
            assert lid in layers, f"layer {lid} lost in a crash of an operation on {crashed}"
    assert driver.exists(crashed) == (crashed in layers)
    return driver


def _crash(
    case: Case, spec: str, job: dict[str, Any], state: str, redo: Callable[[Any], None]
) -> None:
    """Kill a worker running ``job`` while its layer's record is in ``state``.

    Watched from outside first; when the operation is too quick for that (an O(1) snapshot),
    ``redo`` puts the home back as it was and a worker that stops itself at ``state`` runs it
    again, so the check never passes without a kill in the middle.
    """
    if _kill_when(_spawn(case, spec, job), case.home, job["layer"], state):
        return
    driver = case.open()
    redo(driver)
    driver.cleanup()
    stopped = _spawn(case, spec, {**job, "stop_at": state})
    assert _kill_when(stopped, case.home, job["layer"], state), f"never reached {state}"


def test_crash_during_create(gd_case: Case) -> None:
    """A process killed while creating a child leaves the child absent (or whole)."""
    driver = gd_case.open()
    spec = _require_spec(gd_case, driver)
    make_layer(driver, "base", None, _big_tree)
    expected = {"base": tree(driver, "base"), "child": tree(driver, "base")}
    driver.cleanup()

    job = {"op": "create", "layer": "child", "parent": "base"}
    _crash(gd_case, spec, job, "creating", lambda d: d.remove("child"))

    again = _check_after_crash(gd_case, expected, "child")
    again.remove("child", missing_ok=True)
    again.create("child", "base")
    assert_same_tree(expected["child"], tree(again, "child"), "child created after the crash")


def test_crash_during_remove(gd_case: Case) -> None:
    """A process killed while removing a layer leaves it absent (or whole), its parent whole."""
    driver = gd_case.open()
    spec = _require_spec(gd_case, driver)
    make_layer(driver, "base", None, lambda r: write(r, "small", b"parent"))
    make_layer(driver, "big", "base", _big_tree)
    expected = {"base": tree(driver, "base"), "big": tree(driver, "big")}
    driver.cleanup()

    job = {"op": "remove", "layer": "big"}
    _crash(gd_case, spec, job, "removing", lambda d: make_layer(d, "big", "base", _big_tree))

    again = _check_after_crash(gd_case, expected, "big")
    again.remove("big", missing_ok=True)
    again.remove("base")
    assert again.list_layers() == []


def _feed(pipe: IO[bytes], data: bytes, errors: list[BaseException]) -> None:
    try:
        pipe.write(data)
        pipe.flush()
    except BrokenPipeError:
        pass  # the worker was killed or failed; its exit status tells which
    except BaseException as exc:
        errors.append(exc)


def test_crash_during_apply(gd_case: Case) -> None:
    """A process killed half-way through apply_diff leaves no layer; the parent is whole."""
    driver = gd_case.open()
    spec = _require_spec(gd_case, driver)
    make_layer(driver, "base", None, lambda r: write(r, "small", b"parent"))
    make_layer(driver, "source", "base", _big_tree)
    data = read_diff(driver, "source", "base")
    expected = {
        "base": tree(driver, "base"),
        "source": tree(driver, "source"),
        "applied": tree(driver, "source"),
    }
    driver.cleanup()

    proc = _spawn(
        gd_case, spec, {"op": "apply", "layer": "applied", "parent": "base"}, stdin=subprocess.PIPE
    )
    errors: list[BaseException] = []
    feeder = threading.Thread(target=_feed, args=(proc.stdin, data[: len(data) // 2], errors))
    feeder.start()
    try:
        caught = _kill_when(proc, gd_case.home, "applied", "applying")
    finally:
        feeder.join()
        proc.stdin.close()
    assert not errors, errors
    assert caught, "the worker finished an apply of half a tar"

    again = _check_after_crash(gd_case, expected, "applied")
    assert not again.exists("applied"), "a half-applied layer survived the crash"
    apply_bytes(again, "applied", "base", data)
    assert_same_tree(expected["applied"], tree(again, "applied"), "apply after the crash")


def test_two_processes_one_home(gd_case: Case) -> None:
    """Two processes creating and removing layers on one home leave a consistent store."""
    driver = gd_case.open()
    spec = _require_spec(gd_case, driver)
    make_layer(driver, "base", None, lambda r: write(r, "who", b"base"))
    driver.cleanup()

    count = 12
    procs = [
        _spawn(gd_case, spec, {"op": "churn", "layer": name, "parent": "base", "count": count})
        for name in ("p1", "p2")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"worker failed: {err.decode(errors='replace')}"

    again = gd_case.open()
    kept = {f"{name}-{n}" for name in ("p1", "p2") for n in range(count) if n % 2 == 0}
    assert sorted(again.list_layers()) == sorted(kept | {"base"})
    for lid in kept:
        with again.mounted(lid) as root:
            assert (Path(root) / "who").read_text() == lid
        assert again.parent(lid) == "base"
    assert [r.id for r in again.store.unfinished()] == []
