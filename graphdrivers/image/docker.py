"""Reading a ``docker save`` archive (also what ``skopeo copy ... docker-archive:`` writes).

The archive is a tar, read in place (see :class:`~graphdrivers.image.model.TarFiles`)::

    manifest.json               [{"Config": "<file>", "RepoTags": ["repo:tag"], "Layers": [...]}]
    <config file>               the image config (rootfs.diff_ids: the uncompressed layer digests)
    <layer files>               layer tars, bottom to top, plain or gzip (told by first bytes)
    repositories                the legacy tag map (not read)

Docker 25 and later write the same ``manifest.json`` into an OCI layout inside the tar, with
layers at ``blobs/sha256/<hex>``; such names give the blob digest, which is then checked too.
Otherwise only the diff ids of the config verify the layers.

A tag matches an entry's ``RepoTags`` in full (``docker.io/library/busybox:1``), without the
registry and path (``busybox:1``), or by the tag alone (``1``) when that is unambiguous.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from graphdrivers.errors import InvalidArchive
from graphdrivers.image.digest import Digest
from graphdrivers.image.model import Image, LayerBlob, SourceFiles, TagNotFound
from graphdrivers.image.oci import config_diff_ids

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_BLOB_NAME = re.compile(r"(?:.*/)?blobs/sha256/([0-9a-f]{64})")


def is_docker_archive(files: SourceFiles) -> bool:
    return files.exists(MANIFEST_FILE)


def _tag_forms(repo_tag: str) -> list[str]:
    """``docker.io/library/busybox:1`` -> itself, ``busybox:1`` and ``1``."""
    short = repo_tag.rsplit("/", 1)[-1]
    return [repo_tag, short, short.rpartition(":")[2]]


def read_archive(files: SourceFiles, tag: str | None) -> Image:
    """Choose the image ``tag`` from ``manifest.json`` and read its config."""
    where = str(files.root)
    entries = files.read_json(MANIFEST_FILE)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidArchive(f"{where}: manifest.json is not a list of images", path=where)

    entry = _choose(entries, tag, where)
    config_name = entry.get("Config")
    layers = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layers, list):
        raise InvalidArchive(
            f"{where}: manifest.json entry has no Config or no Layers", path=where
        )

    config = files.read_json(config_name)
    if not isinstance(config, dict):
        raise InvalidArchive(f"{where}: {config_name} is not a JSON object", path=where)
    diff_ids = config_diff_ids(config, len(layers), where)

    blobs = []
    for i, name in enumerate(layers):
        if not isinstance(name, str):
            raise InvalidArchive(
                f"{where}: layer {i} in manifest.json is not a file name", path=where
            )
        named = _BLOB_NAME.fullmatch(name)
        blobs.append(
            LayerBlob(
                name=name,
                compression=None,
                digest=Digest(f"sha256:{named.group(1)}") if named else None,
                size=None,
                diff_id=diff_ids[i] if diff_ids else None,
            )
        )
    log.debug("%s: image %s has %d layers", where, tag, len(blobs))
    return Image(source=where, tag=tag, config=config, layers=blobs, files=files)


def _repo_tags(entry: dict[str, Any]) -> list[str]:
    tags = entry.get("RepoTags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _choose(entries: list[dict[str, Any]], tag: str | None, where: str) -> dict[str, Any]:
    every = [t for e in entries for t in _repo_tags(e)]
    shown = ", ".join(every) or "none"
    if tag is None:
        if len(entries) == 1:
            return entries[0]
        raise TagNotFound(
            f"{where} holds {len(entries)} images; name one with ARCHIVE:TAG (tags: {shown})",
            source=where,
            available=every,
        )

    for form in range(3):  # the full tag first, then the shorter forms
        matches = [e for e in entries if any(_tag_forms(t)[form] == tag for t in _repo_tags(e))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise TagNotFound(
                f"{where} has {len(matches)} images tagged {tag!r}; name one by its full tag "
                f"(tags: {shown})",
                source=where,
                available=every,
            )
    raise TagNotFound(
        f"{where} has no image tagged {tag!r} (tags: {shown})", source=where, available=every
    )
