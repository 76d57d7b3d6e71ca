"""The layer store: atomic records, the cross-process lock, crash-left states."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from graphdrivers.errors import DriverError, LayerNotFound
from graphdrivers.ids import LayerId
from graphdrivers.store import LayerState, LayerStore, atomic_write, order_children_first


def test_home_and_private_dirs_get_their_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = LayerStore(tmp_path / "home")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.home).st_mode) == 0o710
    assert stat.S_IMODE(os.stat(store.layers_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.staging_dir).st_mode) == 0o700


def test_record_round_trip_and_states(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    store.new_record(LayerId("a"), None, rw=True, storage_opt={"size": "1M"})
    rec = store.get(LayerId("a"))
    assert rec is not None and rec.state is LayerState.CREATING
    assert rec.rw and rec.storage_opt == {"size": "1M"}

    with pytest.raises(LayerNotFound):
        store.require(LayerId("a"))
    store.set_state(LayerId("a"), LayerState.READY)
    assert store.require(LayerId("a")).state is LayerState.READY

    store.delete(LayerId("a"))
    assert store.get(LayerId("a")) is None
    assert store.records() == []


def test_corrupt_record_names_the_file(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    (store.layers_dir / "bad.json").write_text("{not json")
    with pytest.raises(DriverError, match=r"bad\.json is corrupt"):
        store.get(LayerId("bad"))


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_unfinished_lists_children_before_parents(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    for lid, parent in [("base", None), ("mid", "base"), ("top", "mid"), ("side", "base")]:
        store.new_record(LayerId(lid), LayerId(parent) if parent else None)
    store.set_state(LayerId("side"), LayerState.READY)
    assert [r.id for r in store.unfinished()] == ["top", "mid", "base"]


def test_order_children_first_on_a_forest(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    chain = [("r1", None), ("r2", None), ("c1", "r1"), ("g1", "c1"), ("c2", "r2")]
    for lid, parent in chain:
        store.new_record(LayerId(lid), LayerId(parent) if parent else None)
    order = [r.id for r in order_children_first(store.records())]
    for lid, parent in chain:
        if parent:
            assert order.index(LayerId(lid)) < order.index(LayerId(parent))


def _hold_lock_and_append(home: str, path: str, n: int) -> None:
    store = LayerStore(Path(home))
    for _ in range(n):
        with store.lock():
            # A read-modify-write that loses updates unless the lock serialises processes.
            value = int(Path(path).read_text())
            Path(path).write_text(str(value + 1))


def test_lock_serialises_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_hold_lock_and_append, args=(str(tmp_path / "h"), str(counter), 200))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "800"


def test_lock_is_reentrant_within_a_thread(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    with store.lock(), store.lock():
        store.new_record(LayerId("x"), None)
    assert store.get(LayerId("x")) is not None
