"""Reading an OCI image layout: ``oci-layout``, ``index.json``, and the blobs they point to.

An image layout is a directory (or a tar of one)::

    oci-layout                  {"imageLayoutVersion": "1.0.0"}
    index.json                  an image index: descriptors of manifests (or of nested indexes)
    blobs/sha256/<hex>          every manifest, config and layer, named by its own sha256

A tag is the ``org.opencontainers.image.ref.name`` annotation of a descriptor in
``index.json``. Choosing an image:

- with a tag, the one descriptor whose ref name is the tag (or ends with ``:<tag>``, for
  layouts that store a full reference such as ``docker.io/library/busybox:1``);
- without a tag, the only descriptor, if there is exactly one;
- a descriptor that is itself an index (a multi-platform image) is resolved to the manifest
  for the requested platform (default ``linux`` and this host's architecture), or to its only
  manifest.

Anything else raises :class:`~graphdrivers.image.model.TagNotFound` naming the tags there are.
Every blob read is checked against its descriptor's digest and size.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

from graphdrivers.archive.compression import Compression
from graphdrivers.errors import InvalidArchive
from graphdrivers.image.digest import Digest, digest_hex, parse_digest
from graphdrivers.image.model import Image, LayerBlob, SourceFiles, TagNotFound

log = logging.getLogger(__name__)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MEDIA_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({MEDIA_MANIFEST, DOCKER_MANIFEST})

# Layer media types by their ending: OCI (+ its non-distributable variant) and Docker v2.
LAYER_SUFFIXES = {
    ".tar": Compression.NONE,
    ".tar+gzip": Compression.GZIP,
    ".tar+zstd": Compression.ZSTD,
    ".tar.gzip": Compression.GZIP,  # application/vnd.docker.image.rootfs.diff.tar.gzip
}
MAX_INDEX_DEPTH = 4

# Python's names for machines -> the GOARCH names OCI platforms use.
_ARCH_NAMES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_platform() -> str:
    """``os/architecture`` of this host in OCI's words, e.g. ``linux/amd64``."""
    machine = platform.machine()
    return f"linux/{_ARCH_NAMES.get(machine, machine)}"


def is_layout(files: SourceFiles) -> bool:
    return files.exists(LAYOUT_FILE) and files.exists(INDEX_FILE)


def blob_name(digest: Digest) -> str:
    return f"{BLOBS_DIR}/sha256/{digest_hex(digest)}"


def read_layout(files: SourceFiles, tag: str | None, *, want_platform: str | None = None) -> Image:
    """Choose the image ``tag`` (see the module docstring) and read its manifest and config."""
    layout = files.read_json(LAYOUT_FILE)
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if version != LAYOUT_VERSION:
        raise InvalidArchive(
            f"{files.describe(LAYOUT_FILE)}: unsupported imageLayoutVersion {version!r} "
            f"(expected {LAYOUT_VERSION!r})",
            path=files.describe(LAYOUT_FILE),
            expected=LAYOUT_VERSION,
            got=version,
        )

    index = files.read_json(INDEX_FILE)
    descriptor = _choose_tagged(files, _descriptors(index, files.describe(INDEX_FILE)), tag)
    manifest = _resolve_manifest(files, descriptor, want_platform or host_platform(), depth=0)
    return _image_from_manifest(files, manifest, tag)


def _descriptors(index: Any, where: str) -> list[dict[str, Any]]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
        raise InvalidArchive(f"{where} is not an image index (no 'manifests' list)", path=where)
    return manifests


def ref_name(descriptor: dict[str, Any]) -> str | None:
    annotations = descriptor.get("annotations")
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None


def list_tags(files: SourceFiles) -> list[str]:
    """The ref names of an image layout's index, in index order."""
    index = files.read_json(INDEX_FILE)
    names = (ref_name(d) for d in _descriptors(index, files.describe(INDEX_FILE)))
    return [n for n in names if n is not None]


def _choose_tagged(
    files: SourceFiles, descriptors: list[dict[str, Any]], tag: str | None
) -> dict[str, Any]:
    tags = [n for n in (ref_name(d) for d in descriptors) if n is not None]
    shown = ", ".join(tags) if tags else "none"
    where = str(files.root)

    if tag is None:
        if len(descriptors) == 1:
            return descriptors[0]
        raise TagNotFound(
            f"{where} holds {len(descriptors)} images; name one with DIR:TAG (tags: {shown})",
            source=where,
            available=tags,
        )

    exact = [d for d in descriptors if ref_name(d) == tag]
    matches = exact or [d for d in descriptors if (ref_name(d) or "").endswith(f":{tag}")]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TagNotFound(
            f"{where} has no image tagged {tag!r} (tags: {shown})", source=where, available=tags
        )
    raise TagNotFound(
        f"{where} has {len(matches)} images tagged {tag!r}; name one by its full tag "
        f"(tags: {shown})",
        source=where,
        available=tags,
    )


def _read_descriptor_blob(files: SourceFiles, descriptor: dict[str, Any]) -> Any:
    digest = parse_digest(descriptor.get("digest"), what=f"descriptor digest in {files.root}")
    size = descriptor.get("size")
    return files.read_json(
        blob_name(digest), digest=digest, size=size if isinstance(size, int) else None
    )


def _resolve_manifest(
    files: SourceFiles, descriptor: dict[str, Any], want_platform: str, *, depth: int
) -> dict[str, Any]:
    """Follow nested indexes down to one image manifest."""
    content = _read_descriptor_blob(files, descriptor)
    if not isinstance(content, dict):
        raise InvalidArchive(
            f"{files.root}: blob {descriptor.get('digest')} is not a JSON object",
            path=str(files.root),
        )

    media = descriptor.get("mediaType") or content.get("mediaType")
    if media in MANIFEST_TYPES or (media is None and "layers" in content):
        return content
    if media not in INDEX_TYPES and "manifests" not in content:
        raise InvalidArchive(
            f"{files.root}: {descriptor.get('digest')} has media type {media!r}, "
            "neither an image manifest nor an index",
            path=str(files.root),
            got=media,
        )
    if depth >= MAX_INDEX_DEPTH:
        raise InvalidArchive(
            f"{files.root}: indexes nested deeper than {MAX_INDEX_DEPTH}", path=str(files.root)
        )

    chosen = _choose_platform(files, _descriptors(content, str(files.root)), want_platform)
    return _resolve_manifest(files, chosen, want_platform, depth=depth + 1)


def _platform_of(descriptor: dict[str, Any]) -> str | None:
    plat = descriptor.get("platform")
    if not isinstance(plat, dict):
        return None
    name = f"{plat.get('os')}/{plat.get('architecture')}"
    return name + (f"/{plat['variant']}" if plat.get("variant") else "")


def _choose_platform(
    files: SourceFiles, descriptors: list[dict[str, Any]], want: str
) -> dict[str, Any]:
    if len(descriptors) == 1:
        return descriptors[0]
    matches = [d for d in descriptors if (_platform_of(d) or "").startswith(want)]
    if matches:
        return matches[0]
    have = ", ".join(p for p in (_platform_of(d) for d in descriptors) if p) or "none named"
    raise TagNotFound(
        f"{files.root}: the image has no manifest for platform {want} (platforms: {have})",
        source=str(files.root),
        available=[],
    )


def _layer_compression(media: object, where: str) -> Compression:
    if isinstance(media, str):
        for suffix, compression in LAYER_SUFFIXES.items():
            if media.endswith(suffix):
                return compression
    raise InvalidArchive(f"{where}: unsupported layer media type {media!r}", path=where, got=media)


def _image_from_manifest(files: SourceFiles, manifest: dict[str, Any], tag: str | None) -> Image:
    where = str(files.root)
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layers, list):
        raise InvalidArchive(f"{where}: the manifest has no config or no layers list", path=where)

    config = _read_descriptor_blob(files, config_desc)
    if not isinstance(config, dict):
        raise InvalidArchive(f"{where}: the image config is not a JSON object", path=where)
    diff_ids = config_diff_ids(config, len(layers), where)

    blobs = []
    for i, desc in enumerate(layers):
        if not isinstance(desc, dict):
            raise InvalidArchive(f"{where}: layer descriptor {i} is not an object", path=where)
        digest = parse_digest(desc.get("digest"), what=f"{where}: layer {i} digest")
        size = desc.get("size")
        blobs.append(
            LayerBlob(
                name=blob_name(digest),
                compression=_layer_compression(desc.get("mediaType"), where),
                digest=digest,
                size=size if isinstance(size, int) else None,
                diff_id=diff_ids[i] if diff_ids else None,
            )
        )
    log.debug("%s: image %s has %d layers", where, tag, len(blobs))
    return Image(source=where, tag=tag, config=config, layers=blobs, files=files)


def config_diff_ids(config: dict[str, Any], layers: int, where: str) -> list[Digest] | None:
    """The config's ``rootfs.diff_ids``, checked against the number of layers (None if absent)."""
    rootfs = config.get("rootfs")
    raw = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != layers:
        count = len(raw) if isinstance(raw, list) else raw
        raise InvalidArchive(
            f"{where}: the config lists {count} diff ids for {layers} layers",
            path=where,
            expected=layers,
            got=count,
        )
    return [parse_digest(d, what=f"{where}: diff id") for d in raw]
