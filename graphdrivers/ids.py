"""Layer ids: the grammar every driver accepts, and the names drivers keep for themselves.

A layer id is ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``: it can be used as one path component and in
a mount option string without quoting, it cannot be ``.`` or ``..``, and it cannot start with a
dot (the store's temporary files do). Drivers reserve a few more names for their own directories
(overlay's ``l``, for example) and pass them to :func:`validate_layer_id`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NewType

from graphdrivers.errors import InvalidLayerId

LayerId = NewType("LayerId", str)

LAYER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_LAYER_ID_RE = re.compile(LAYER_ID_PATTERN)

# Names every driver's home uses for its own bookkeeping (see graphdrivers.store), and the
# command line's mount records (graphdrivers.cli.common), which sit beside the layers.
STORE_RESERVED = frozenset({"layers", "lock", "staging", "cli-mounts.json"})


def validate_layer_id(layer_id: object, reserved: Iterable[str] = ()) -> LayerId:
    """Return ``layer_id`` as a :data:`LayerId`, or raise :class:`InvalidLayerId` saying why."""
    if not isinstance(layer_id, str):
        raise InvalidLayerId(f"layer id must be a string, got {type(layer_id).__name__}")

    if not _LAYER_ID_RE.fullmatch(layer_id):
        raise InvalidLayerId(
            f"invalid layer id {layer_id!r}: ids are 1-128 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit",
            layer_id=layer_id,
        )

    if layer_id in STORE_RESERVED or layer_id in set(reserved):
        raise InvalidLayerId(
            f"layer id {layer_id!r} is reserved for the driver's own use; pick another",
            layer_id=layer_id,
        )
    return LayerId(layer_id)
