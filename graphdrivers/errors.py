"""The error tree of graphdrivers.

Every error a driver raises on purpose derives from :class:`DriverError`. Each one carries the
fields a caller needs to act on it (layer id, path, what was expected and what was found), and its
message says what went wrong and what to do about it::

    DriverError
     ├── LayerNotFound        (also KeyError)        no layer with that id
     ├── LayerExists          (also FileExistsError) the id is taken
     ├── ParentNotFound                              create() named a parent that does not exist
     ├── LayerHasChildren                            remove() of a layer other layers build on
     ├── LayerBusy                                   remove() of a mounted layer; conflicting use
     ├── NotMounted                                  put() without a matching get()
     ├── InvalidLayerId       (also ValueError)      id does not match the id grammar, or reserved
     ├── InvalidOption        (also ValueError)      unknown or malformed driver or storage option
     ├── InvalidArchive                              a layer tar that is malformed or over a cap
     │    └── BreakoutError                          an entry that would reach outside the layer
     ├── QuotaExceeded                               a write went past a layer's size limit
     ├── MountError                                  mounting or unmounting a layer failed
     └── NotSupported                                the host lacks a feature the driver needs

``NotSupported`` names the missing thing (kernel filesystem, tool, privilege, backing
filesystem) in :attr:`NotSupported.missing`; the conformance suite turns it into a skip whose
reason is that name, and ``graphdrivers doctor`` prints it with :attr:`NotSupported.hint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DriverError(Exception):
    """Root of every error a driver raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        layer_id: str | None = None,
        path: Path | str | None = None,
        expected: object = None,
        got: object = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.layer_id = layer_id
        self.path = path
        self.expected = expected
        self.got = got

    def __str__(self) -> str:
        return self.message


class LayerNotFound(DriverError, KeyError):
    """No layer with this id exists in the driver's home."""

    def __init__(self, layer_id: str, *, hint: str = "") -> None:
        msg = f"layer {layer_id!r} does not exist"
        super().__init__(msg + (f"; {hint}" if hint else ""), layer_id=layer_id)

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.message


class LayerExists(DriverError, FileExistsError):
    """The id is already used by a layer."""

    def __init__(self, layer_id: str) -> None:
        super().__init__(
            f"layer {layer_id!r} already exists; pick another id or remove it first",
            layer_id=layer_id,
        )


class ParentNotFound(DriverError):
    """``create`` or ``apply_diff`` named a parent layer that does not exist."""

    def __init__(self, layer_id: str, parent: str) -> None:
        super().__init__(
            f"cannot create {layer_id!r}: parent layer {parent!r} does not exist",
            layer_id=layer_id,
            expected=parent,
        )
        self.parent = parent


class LayerHasChildren(DriverError):
    """``remove`` of a layer that is the parent of other layers."""

    def __init__(self, layer_id: str, children: Sequence[str]) -> None:
        names = ", ".join(sorted(children))
        super().__init__(
            f"layer {layer_id!r} is the parent of {names}; remove those layers first",
            layer_id=layer_id,
            got=children,
        )
        self.children = list(children)


class LayerBusy(DriverError):
    """The layer is in use (mounted, or being changed) and the operation needs it idle."""


class NotMounted(DriverError):
    """``put`` of a layer that has no outstanding ``get``."""

    def __init__(self, layer_id: str, message: str | None = None) -> None:
        super().__init__(
            message or f"put({layer_id!r}) without a matching get(); every put must follow a get",
            layer_id=layer_id,
        )


class InvalidLayerId(DriverError, ValueError):
    """The id does not match ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` or is reserved."""


class InvalidOption(DriverError, ValueError):
    """An unknown or malformed driver option or storage option."""


class InvalidArchive(DriverError):
    """A layer tar stream is malformed, truncated, or exceeds a safety cap."""


class BreakoutError(InvalidArchive):
    """A layer tar entry would create, change or delete something outside the layer root."""


class QuotaExceeded(DriverError):
    """A write went past the size limit set on a layer."""


class MountError(DriverError):
    """Mounting or unmounting a layer failed."""


class NotSupported(DriverError):
    """This host lacks something the driver needs.

    ``missing`` names the thing in a few words ("kernel filesystem btrfs", "tool mkfs.btrfs",
    "privilege CAP_SYS_ADMIN", "backing filesystem btrfs at /var/lib/x"); ``hint`` says how a
    user gets it.
    """

    def __init__(self, missing: str, *, hint: str = "", driver: str | None = None) -> None:
        who = f"{driver}: " if driver else ""
        msg = f"{who}not supported on this host: missing {missing}"
        super().__init__(msg + (f" ({hint})" if hint else ""))
        self.missing = missing
        self.hint = hint
        self.driver = driver
