"""Threads sharing one driver: distinct layers in parallel, and one layer got and put by many."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.helpers import make_layer, write
from graphdrivers.errors import NotMounted

THREADS = 8
ROUNDS = 6


def _in_threads(work: Callable[[int], None], n: int = THREADS) -> None:
    """Run ``work(i)`` in n threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} thread(s) failed; first: {errors[0]!r}") from errors[
            0
        ]


def test_threads_distinct_layers(driver: Any) -> None:
    """Threads create, write, read and remove their own layers on one driver at once."""
    make_layer(driver, "base", None, lambda r: write(r, "who", b"base"))

    def work(i: int) -> None:
        for n in range(ROUNDS):
            lid = f"t{i}-{n}"
            driver.create(lid, "base")
            with driver.mounted(lid) as root:
                assert (Path(root) / "who").read_bytes() == b"base"
                (Path(root) / "who").write_text(lid)
            with driver.mounted(lid) as root:
                assert (Path(root) / "who").read_text() == lid
            if n % 2:
                driver.remove(lid)
            driver.exists(lid)
            driver.list_layers()

    _in_threads(work)
    kept = {f"t{i}-{n}" for i in range(THREADS) for n in range(ROUNDS) if n % 2 == 0}
    assert sorted(driver.list_layers()) == sorted(kept | {"base"})
    for lid in kept:
        with driver.mounted(lid) as root:
            assert (Path(root) / "who").read_text() == lid


def test_threads_same_layer_get_put(driver: Any) -> None:
    """Many threads getting and putting one layer keep the count right."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"shared"))

    def work(i: int) -> None:
        for _ in range(20):
            root = Path(driver.get("base"))
            assert (root / "f").read_bytes() == b"shared"
            driver.put("base")

    _in_threads(work)
    assert not driver.is_mounted("base")
    with pytest.raises(NotMounted):
        driver.put("base")
