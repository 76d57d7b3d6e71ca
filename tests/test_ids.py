"""Layer id grammar and reserved names."""

from __future__ import annotations

import pytest

from graphdrivers.errors import InvalidLayerId
from graphdrivers.ids import validate_layer_id


@pytest.mark.parametrize(
    "good", ["a", "0", "base", "layer-1", "sha256_abc.def", "A" * 128, "x.y-z_0"]
)
def test_valid_ids_are_accepted(good: str) -> None:
    assert validate_layer_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../x",
        "/",
        "a/b",
        ".hidden",
        "-dash",
        "_under",
        "a" * 129,
        "sp ace",
        "nul\0",
        "é",
    ],
)
def test_invalid_ids_are_refused_with_the_grammar(bad: str) -> None:
    with pytest.raises(InvalidLayerId, match="letters, digits"):
        validate_layer_id(bad)


@pytest.mark.parametrize("reserved", ["layers", "lock", "staging", "cli-mounts.json"])
def test_store_names_are_reserved(reserved: str) -> None:
    with pytest.raises(InvalidLayerId, match="reserved"):
        validate_layer_id(reserved)


def test_driver_reserved_names_are_refused() -> None:
    assert validate_layer_id("l") == "l"
    with pytest.raises(InvalidLayerId, match="reserved"):
        validate_layer_id("l", reserved={"l"})


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidLayerId, match="must be a string"):
        validate_layer_id(5)
