"""get/put reference counting: mounted until the last put; put without get is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.helpers import make_layer, write
from graphdrivers.errors import LayerBusy, NotMounted


def test_get_twice_put_twice(driver: Any) -> None:
    """Two gets give one mountpoint; it stays usable until the second put."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"content"))
    first = Path(driver.get("base"))
    second = Path(driver.get("base"))
    assert first == second, f"second get gave {second}, first {first}"
    assert first.is_absolute()

    driver.put("base")
    assert driver.is_mounted("base"), "unmounted after the first of two puts"
    assert (first / "f").read_bytes() == b"content", "content gone before the last put"

    driver.put("base")
    assert not driver.is_mounted("base")
    with pytest.raises(NotMounted):
        driver.put("base")


def test_put_without_get(driver: Any) -> None:
    """put of a layer nobody got raises NotMounted, and then get/put still work."""
    driver.create("base")
    with pytest.raises(NotMounted):
        driver.put("base")
    with driver.mounted("base"):
        assert driver.is_mounted("base")
    assert not driver.is_mounted("base")


def test_remove_while_mounted(driver: Any) -> None:
    """remove of a mounted layer raises LayerBusy and keeps it; after put it can go."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"kept"))
    root = Path(driver.get("base"))
    with pytest.raises(LayerBusy):
        driver.remove("base")
    assert driver.exists("base")
    assert (root / "f").read_bytes() == b"kept"

    driver.put("base")
    driver.remove("base")
    assert not driver.exists("base")


def test_mounted_releases_on_error(driver: Any) -> None:
    """mounted() puts the layer back even when the block raises."""
    driver.create("base")
    with pytest.raises(RuntimeError), driver.mounted("base"):
        raise RuntimeError("inside the block")
    assert not driver.is_mounted("base")
    driver.remove("base")


def test_layers_mounted_side_by_side(driver: Any) -> None:
    """A parent and its children mounted at once each show their own content."""
    make_layer(driver, "base", None, lambda r: write(r, "who", b"base"))
    make_layer(driver, "a", "base", lambda r: write(r, "who", b"a"))
    make_layer(driver, "b", "base", lambda r: write(r, "who", b"b"))
    with driver.mounted("base") as base, driver.mounted("a") as a, driver.mounted("b") as b:
        got = [(Path(p) / "who").read_bytes() for p in (base, a, b)]
        assert got == [b"base", b"a", b"b"], got
        assert len({Path(base), Path(a), Path(b)}) == 3, "two layers share a mountpoint"
