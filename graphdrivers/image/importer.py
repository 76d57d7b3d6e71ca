"""Stacking an image's layers into any driver: :func:`import_image`.

Each layer of the image becomes one layer of the driver, the child of the one below, filled by
``Driver.apply_diff`` from a :class:`~graphdrivers.image.digest.LayerStream` that checks the
blob digest and the diff id while the tar is read.

Layer ids. By default a layer's id is the 64 hex digits of its OCI *chain id* (the digest of
the stack up to and including it, see :mod:`~graphdrivers.image.digest`). The id is
deterministic and names the content: a layer that already exists with that id (and the expected
parent) *is* that stack, so it is reused, not applied again, and two images sharing base
layers share those driver layers. An image whose config records no diff ids gets ids chained
the same way from its blob digests instead. ``layer_ids=`` names the layers explicitly; then an
id that exists already raises :class:`~graphdrivers.errors.LayerExists`.

All or nothing. If any layer fails (a digest mismatch, a malformed tar, an interrupt), the
layers this call created are removed again, top down; layers it reused stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from graphdrivers.driver import Driver
from graphdrivers.errors import DriverError, InvalidArchive, InvalidOption, LayerExists
from graphdrivers.ids import LayerId, validate_layer_id
from graphdrivers.image.digest import Digest, chain_ids, digest_hex
from graphdrivers.image.model import Image
from graphdrivers.image.source import open_image

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` in stored (compressed) blob bytes."""


def layer_ids_for(image: Image) -> list[LayerId]:
    """The default layer ids of an image's layers, bottom to top (see the module docstring)."""
    names: list[Digest] | None = image.diff_ids
    if names is None:
        blob_digests = [layer.digest for layer in image.layers]
        if any(d is None for d in blob_digests):
            raise InvalidArchive(
                f"{image.source}: the config records no diff ids and the layers have no "
                "digests, so no layer ids can be derived; pass layer_ids=",
                path=image.source,
            )
        names = [d for d in blob_digests if d is not None]
    return [LayerId(digest_hex(chain)) for chain in chain_ids(names)]


def import_image(
    driver: Driver,
    source: str | Path | Image,
    *,
    tag: str | None = None,
    layer_ids: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> list[LayerId]:
    """Stack the image ``source`` (``PATH[:TAG]``, or an opened Image) into ``driver``.

    Returns the layer ids bottom to top; the last one is the image's top layer, which
    ``driver.get`` mounts as the image's root filesystem.
    """
    if isinstance(source, Image):
        return _import(driver, source, layer_ids, progress)
    with open_image(source, tag=tag) as image:
        return _import(driver, image, layer_ids, progress)


def _import(
    driver: Driver,
    image: Image,
    layer_ids: Sequence[str] | None,
    progress: ProgressCallback | None,
) -> list[LayerId]:
    explicit = layer_ids is not None
    if layer_ids is not None:
        ids = _explicit_ids(image, layer_ids, driver)
    else:
        ids = layer_ids_for(image)
    sizes = [image.files.size(layer.name) for layer in image.layers]
    total, done = sum(sizes), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    created: list[LayerId] = []
    try:
        for index, layer_id in enumerate(ids):
            parent = ids[index - 1] if index else None
            # Under the store lock (which apply_diff holds anyway), so that another process
            # importing the same chain cannot slip in between the check and the apply.
            with driver.store.lock():
                if _reusable(driver, layer_id, parent, explicit):
                    log.info(
                        "layer %d/%d of %s: %s exists, reused",
                        index + 1,
                        len(ids),
                        image.source,
                        layer_id,
                    )
                    advance(sizes[index])
                    continue
                _apply_one(driver, image, index, layer_id, parent, advance)
            created.append(layer_id)
            log.info(
                "layer %d/%d of %s: applied as %s", index + 1, len(ids), image.source, layer_id
            )
    except BaseException:
        _remove_created(driver, created)
        raise

    if progress is not None and done != total:
        progress(total, total)
    return ids


def _explicit_ids(image: Image, layer_ids: Sequence[str], driver: Driver) -> list[LayerId]:
    ids = [validate_layer_id(i, driver.reserved_ids) for i in layer_ids]
    if len(ids) != len(image.layers):
        raise InvalidOption(
            f"layer_ids names {len(ids)} layers but {image.source} has {len(image.layers)}",
            expected=len(image.layers),
            got=len(ids),
        )
    if len(set(ids)) != len(ids):
        raise InvalidOption(f"layer_ids repeats an id: {ids}", got=ids)
    return ids


def _reusable(driver: Driver, layer_id: LayerId, parent: LayerId | None, explicit: bool) -> bool:
    """True if the layer exists already as the right stack (chain ids only)."""
    if not driver.exists(layer_id):
        return False
    if explicit:
        raise LayerExists(layer_id)
    if driver.parent(layer_id) != parent:
        raise DriverError(
            f"layer {layer_id!r} exists with parent {driver.parent(layer_id)!r}, not {parent!r}:"
            " it was not made by importing this chain; remove it or pass layer_ids=",
            layer_id=layer_id,
            expected=parent,
            got=driver.parent(layer_id),
        )
    return True


def _apply_one(
    driver: Driver,
    image: Image,
    index: int,
    layer_id: LayerId,
    parent: LayerId | None,
    advance: Callable[[int], None],
) -> None:
    with image.open_layer(index, progress=advance) as stream:
        driver.apply_diff(layer_id, parent, stream)  # type: ignore[arg-type]
        try:
            # The tar reader may stop at its end marker; reading on to the end of the blob
            # makes sure its digest was checked (see LayerStream).
            stream.finish()
        except BaseException:
            driver.remove(layer_id, missing_ok=True)
            raise


def _remove_created(driver: Driver, created: list[LayerId]) -> None:
    for layer_id in reversed(created):
        try:
            driver.remove(layer_id, missing_ok=True)
        except DriverError:
            log.exception("could not remove layer %s after a failed import", layer_id)
