"""Writing a driver's layer chain as an OCI image layout: :func:`export_image`.

The chain is the top layer and its parents down to a layer without one. Each layer becomes one
blob, ``driver.diff(layer, parent)`` compressed as asked; its diff id (the digest of the
uncompressed tar) goes into the config's ``rootfs.diff_ids``. The result::

    DEST/oci-layout             {"imageLayoutVersion": "1.0.0"}
    DEST/index.json             one descriptor per tag, annotated org.opencontainers.image.ref.name
    DEST/blobs/sha256/<hex>     layers, the config, the manifest

Exporting into a layout that exists already adds the tag to it (replacing an image of the same
tag) and keeps its other images and blobs, as ``umoci`` and ``skopeo`` do. Blobs are written to
a temporary name and renamed once whole, and ``index.json`` is replaced atomically, so a failed
export leaves the layout as it was (plus at most some unreferenced blobs).

The bytes are reproducible: the driver's diff is deterministic for an unchanged layer, gzip
headers carry no name or time, and the config records no creation time, so exporting the same
chain twice gives the same digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from graphdrivers.archive.compression import Compression
from graphdrivers.driver import Driver
from graphdrivers.errors import InvalidArchive, InvalidOption
from graphdrivers.ids import LayerId, validate_layer_id
from graphdrivers.image import oci
from graphdrivers.image.digest import (
    CHUNK_SIZE,
    Digest,
    digest_hex,
    open_compressed_writer,
    sha256_digest,
)
from graphdrivers.store import atomic_write

log = logging.getLogger(__name__)

BLOB_MODE = 0o644  # an image layout is for sharing: readable by all, like umoci's

LAYER_MEDIA_TYPES = {
    Compression.NONE: oci.MEDIA_LAYER,
    Compression.GZIP: oci.MEDIA_LAYER + "+gzip",
    Compression.ZSTD: oci.MEDIA_LAYER + "+zstd",
}


def layer_chain(driver: Driver, top: str) -> list[LayerId]:
    """``top`` and its ancestors, bottom to top."""
    chain = [validate_layer_id(top, driver.reserved_ids)]
    while (parent := driver.parent(chain[-1])) is not None:
        chain.append(parent)
    return chain[::-1]


def export_image(
    driver: Driver,
    top_layer_id: str,
    dest_dir: Path | str,
    *,
    tag: str = "latest",
    compress: Literal["gzip", "none", "zstd"] | Compression = "gzip",
) -> Path:
    """Write the chain ending at ``top_layer_id`` as image ``tag`` of the layout ``dest_dir``.

    Returns ``dest_dir``. ``compress`` is the layer compression: ``gzip`` (what every tool
    reads), ``zstd`` or ``none``.
    """
    try:
        compression = Compression(compress)
    except ValueError as exc:
        raise InvalidOption(
            f"compress={compress!r}: use one of gzip, zstd, none", got=compress
        ) from exc
    if not tag or any(c.isspace() for c in tag):
        raise InvalidOption(f"invalid tag {tag!r}", got=tag)
    dest = Path(dest_dir)
    blobs = _prepare_layout(dest)

    chain = layer_chain(driver, top_layer_id)
    layers, diff_ids = [], []
    for index, layer_id in enumerate(chain):
        parent = chain[index - 1] if index else None
        descriptor, diff_id = _write_layer(driver, layer_id, parent, blobs, compression)
        layers.append(descriptor)
        diff_ids.append(diff_id)
        log.info(
            "exported layer %s as %s (%d bytes)",
            layer_id,
            descriptor["digest"],
            descriptor["size"],
        )

    config = _config(diff_ids)
    config_desc = _write_json_blob(blobs, config, "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_MANIFEST,
        "config": config_desc,
        "layers": layers,
    }
    manifest_desc = _write_json_blob(blobs, manifest, oci.MEDIA_MANIFEST)
    _add_to_index(dest, manifest_desc, tag)
    return dest


def _prepare_layout(dest: Path) -> Path:
    """Make ``dest`` an image layout (or check it is one) and return its blob directory."""
    layout_file, index_file = dest / oci.LAYOUT_FILE, dest / oci.INDEX_FILE
    if dest.exists() and not dest.is_dir():
        raise InvalidOption(f"{dest} exists and is not a directory", path=str(dest))
    if dest.exists() and not layout_file.exists() and any(dest.iterdir()):
        raise InvalidOption(
            f"{dest} exists and is not an OCI image layout; export into an empty or new "
            "directory, or into an existing layout",
            path=str(dest),
        )

    blobs = dest / oci.BLOBS_DIR / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if not layout_file.exists():
        _write_json(layout_file, {"imageLayoutVersion": oci.LAYOUT_VERSION})
    if not index_file.exists():
        _write_json(
            index_file, {"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": []}
        )
    return blobs


def _write_layer(
    driver: Driver,
    layer_id: LayerId,
    parent: LayerId | None,
    blobs: Path,
    compression: Compression,
) -> tuple[dict[str, Any], Digest]:
    """Stream one diff into a blob, hashing the tar and the stored bytes on the way."""
    tar_hash = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, BLOB_MODE)
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingFile(raw)
            writer = open_compressed_writer(hashing, compression)  # type: ignore[arg-type]
            with driver.diff(layer_id, parent) as diff:
                while chunk := diff.read(CHUNK_SIZE):
                    tar_hash.update(chunk)
                    writer.write(chunk)
            writer.close()
            raw.flush()
            os.fsync(raw.fileno())
        digest = Digest(f"sha256:{hashing.hash.hexdigest()}")
        os.replace(tmp, blobs / digest_hex(digest))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    descriptor = {
        "mediaType": LAYER_MEDIA_TYPES[compression],
        "digest": digest,
        "size": hashing.size,
    }
    return descriptor, Digest(f"sha256:{tar_hash.hexdigest()}")


class _HashingFile:
    """A write-through file wrapper that hashes and counts what is written."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._target.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return bool(self._target.closed)


def _config(diff_ids: list[Digest]) -> dict[str, Any]:
    arch = oci.host_platform().split("/")[1]
    return {
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        # Layer ids are left out on purpose: they are names in one home, and leaving them out
        # keeps the export of the same trees the same image wherever it is made.
        "history": [{"created_by": "graphdrivers export_image"} for _ in diff_ids],
    }


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _write_json_blob(blobs: Path, value: Any, media_type: str) -> dict[str, Any]:
    data = _canonical(value)
    digest = sha256_digest(data)
    target = blobs / digest_hex(digest)
    if not target.exists():
        atomic_write(target, data, BLOB_MODE)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, _canonical(value), BLOB_MODE)


def _add_to_index(dest: Path, manifest_desc: dict[str, Any], tag: str) -> None:
    index_file = dest / oci.INDEX_FILE
    try:
        index = json.loads(index_file.read_bytes())
        kept = [d for d in index["manifests"] if oci.ref_name(d) != tag]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArchive(
            f"{index_file} is not a readable image index: {exc}", path=str(index_file)
        ) from exc

    arch = oci.host_platform().split("/")[1]
    entry = dict(
        manifest_desc,
        annotations={oci.REF_NAME: tag},
        platform={"architecture": arch, "os": "linux"},
    )
    index["manifests"] = [*kept, entry]
    _write_json(index_file, index)
    log.info("wrote image %s:%s (%s)", dest, tag, manifest_desc["digest"])
