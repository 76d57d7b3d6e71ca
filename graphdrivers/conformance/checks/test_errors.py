"""Every error of the tree, raised where the contract says, and nothing changed by it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from graphdrivers.conformance.fixtures import Case
from graphdrivers.conformance.helpers import make_layer, tree, write
from graphdrivers.conformance.manifest import assert_same_tree
from graphdrivers.errors import (
    DriverError,
    InvalidLayerId,
    InvalidOption,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    ParentNotFound,
)
from graphdrivers.ids import STORE_RESERVED

INVALID_IDS = [
    "../x",
    "",
    "/",
    "a" * 129,
    ".hidden",
    "a/b",
    ".",
    "..",
    "-dash",
    "sp ace",
    "x\x00y",
    "é",
]

MISSING_CALLS: dict[str, Callable[[Any], object]] = {
    "get": lambda d: d.get("missing"),
    "put": lambda d: d.put("missing"),
    "remove": lambda d: d.remove("missing"),
    "parent": lambda d: d.parent("missing"),
    "metadata": lambda d: d.metadata("missing"),
    "diff": lambda d: d.diff("missing").close(),
    "diff-parent": lambda d: d.diff("base", "missing").close(),
    "changes": lambda d: d.changes("missing"),
    "changes-parent": lambda d: d.changes("base", "missing"),
    "diff_size": lambda d: d.diff_size("missing"),
}


@pytest.mark.parametrize("call", sorted(MISSING_CALLS))
def test_missing_layer(driver: Any, call: str) -> None:
    """Naming a layer that does not exist raises LayerNotFound (put: NotMounted is allowed)."""
    from graphdrivers.errors import NotMounted

    driver.create("base")
    allowed: tuple[type[Exception], ...] = (NotMounted,) if call == "put" else (LayerNotFound,)
    with pytest.raises(allowed) as info:
        MISSING_CALLS[call](driver)
    if isinstance(info.value, LayerNotFound):
        assert isinstance(info.value, KeyError)
        assert info.value.layer_id == "missing", info.value.layer_id
    assert driver.list_layers() == ["base"]
    assert driver.exists("missing") is False


def test_remove_missing_ok(driver: Any) -> None:
    """remove(missing_ok=True) of an unknown layer does nothing."""
    driver.remove("missing", missing_ok=True)
    driver.create("base")
    driver.remove("base", missing_ok=True)
    assert not driver.exists("base")


def test_duplicate_id(driver: Any) -> None:
    """create of an existing id raises LayerExists and leaves the layer as it was."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"first"))
    driver.create("child", "base")
    before = tree(driver, "base")
    for parent in (None, "base", "child"):
        with pytest.raises(LayerExists) as info:
            driver.create("base", parent)
        assert isinstance(info.value, FileExistsError)
    assert driver.parent("base") is None
    assert_same_tree(before, tree(driver, "base"), "a layer after a duplicate create")


def test_missing_parent(driver: Any) -> None:
    """create on a parent that does not exist raises ParentNotFound and creates nothing."""
    with pytest.raises(ParentNotFound) as info:
        driver.create("child", "no-such-parent")
    assert info.value.parent == "no-such-parent"
    assert not driver.exists("child")
    assert driver.list_layers() == []
    driver.create("child")  # the id is still free


def test_remove_parent_with_children(driver: Any) -> None:
    """remove of a layer with children raises LayerHasChildren naming them; nothing is lost."""
    make_layer(driver, "base", None, lambda r: write(r, "f", b"x"))
    driver.create("a", "base")
    driver.create("b", "base")
    before = tree(driver, "base")
    with pytest.raises(LayerHasChildren) as info:
        driver.remove("base")
    assert sorted(info.value.children) == ["a", "b"]
    assert_same_tree(before, tree(driver, "base"), "a parent after a refused remove")
    driver.remove("a")
    with pytest.raises(LayerHasChildren):
        driver.remove("base")
    driver.remove("b")
    driver.remove("base")
    assert driver.list_layers() == []


def _invalid_ids(driver: Any) -> list[str]:
    return [*INVALID_IDS, *sorted(STORE_RESERVED), *sorted(getattr(driver, "reserved_ids", ()))]


def test_invalid_ids(driver: Any) -> None:
    """Ids outside the grammar, and reserved names, raise InvalidLayerId everywhere."""
    driver.create("base")
    calls: dict[str, Callable[[Any, str], object]] = {
        "create": lambda d, bad: d.create(bad),
        "create-parent": lambda d, bad: d.create("ok-child", bad),
        "get": lambda d, bad: d.get(bad),
        "remove": lambda d, bad: d.remove(bad, missing_ok=True),
        "exists": lambda d, bad: d.exists(bad),
    }
    for bad in _invalid_ids(driver):
        for name, call in calls.items():
            with pytest.raises(InvalidLayerId):
                call(driver, bad)
                raise AssertionError(f"{name}({bad!r}) was accepted")
    assert driver.list_layers() == ["base"]


def test_longest_valid_id(driver: Any) -> None:
    """A 128-character id with every allowed character is accepted."""
    longest = "A9" + "_.-z" * 31 + "xy"
    assert len(longest) == 128
    driver.create(longest)
    driver.create("child", longest)
    assert driver.parent("child") == longest
    with driver.mounted(longest):
        pass


def test_unknown_storage_opt(driver: Any) -> None:
    """An unknown storage option raises InvalidOption and creates nothing."""
    with pytest.raises(InvalidOption):
        driver.create("layer", storage_opt={"no-such-option": "1"})
    assert not driver.exists("layer")
    assert driver.list_layers() == []


def test_unknown_driver_option(gd_case: Case) -> None:
    """A driver given an option it does not know raises InvalidOption at construction."""
    import dataclasses

    target = dataclasses.replace(
        gd_case.target, options={**gd_case.target.options, "no.such.option": "1"}
    )
    with pytest.raises(InvalidOption):
        target.open(gd_case.dir / "other-home")


def test_errors_name_the_layer(driver: Any) -> None:
    """Each error carries the layer id, and its message names it."""
    driver.create("base")
    calls: list[Callable[[], object]] = [
        lambda: driver.create("base"),
        lambda: driver.remove("nope"),
        lambda: driver.create("x", "nope"),
    ]
    for call in calls:
        with pytest.raises(DriverError) as info:
            call()
        layer_id = info.value.layer_id
        assert layer_id is not None and layer_id in str(info.value), str(info.value)
