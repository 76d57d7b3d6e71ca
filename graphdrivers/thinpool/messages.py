"""The thin-pool target's messages as text, as ``dmsetup message POOL 0 "..."`` sends them."""

from __future__ import annotations

from graphdrivers.thinpool.errors import ThinPoolError
from graphdrivers.thinpool.pool import ThinPool

POOL_MESSAGES = ("create_thin", "create_snap", "delete", "set_transaction_id")
_ARITY = {"create_thin": 1, "create_snap": 2, "delete": 1, "set_transaction_id": 2}


def parse_message(text: str) -> tuple[str, list[int]]:
    """``"create_snap 5 3"`` -> ``("create_snap", [5, 3])``; ThinPoolError if malformed."""
    words = text.split()
    if not words or words[0] not in _ARITY:
        raise ThinPoolError(f"unknown pool message {text!r}; known: {', '.join(POOL_MESSAGES)}")
    if len(words) != 1 + _ARITY[words[0]]:
        raise ThinPoolError(f"{words[0]} takes {_ARITY[words[0]]} argument(s): {text!r}")
    try:
        return words[0], [int(w) for w in words[1:]]
    except ValueError as exc:
        raise ThinPoolError(f"pool message arguments must be integers: {text!r}") from exc


def send_message(pool: ThinPool, text: str) -> None:
    """Run one message on an open pool (each message commits, as the kernel's do)."""
    verb, args = parse_message(text)
    if verb == "create_thin":
        pool.create_thin(args[0])
    elif verb == "create_snap":
        pool.create_snap(args[0], args[1])
    elif verb == "delete":
        pool.delete(args[0])
    else:
        pool.set_transaction_id(args[0], args[1])
