"""From a reference such as ``images/busybox:1`` to an opened image.

A reference is ``PATH[:TAG]``, where PATH is an OCI image layout (a directory, or a tar of one)
or a ``docker save`` archive. The tag is split off only when the reference as a whole is not
an existing path, at the first ``:`` that leaves an existing path before it, so paths with
colons still work and tags may hold colons (``archive.tar:busybox:1``). A
:class:`~pathlib.Path` is never split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from graphdrivers.errors import InvalidArchive, InvalidOption
from graphdrivers.image import docker, oci
from graphdrivers.image.model import Image, ImageNotFound, open_source_files

log = logging.getLogger(__name__)


def parse_reference(source: str | Path, tag: str | None = None) -> tuple[Path, str | None]:
    """Split ``PATH[:TAG]`` into the path and the tag (``tag`` given separately wins)."""
    if isinstance(source, Path) or Path(source).exists():
        return Path(source), tag

    # The first ":" after which the part before is an existing path: a docker archive's tag
    # may have colons and slashes of its own (archive.tar:docker.io/library/busybox:1).
    for at in (i for i, c in enumerate(source) if c == ":"):
        path, ref_tag = source[:at], source[at + 1 :]
        if path and ref_tag and Path(path).exists():
            if tag is not None and tag != ref_tag:
                raise InvalidOption(
                    f"image reference {source!r} names tag {ref_tag!r} but tag={tag!r} was given",
                    expected=tag,
                    got=ref_tag,
                )
            return Path(path), ref_tag
    raise ImageNotFound(
        f"image {source!r} does not exist (expected PATH or PATH:TAG)", path=source
    )


def open_image(
    source: str | Path, *, tag: str | None = None, platform: str | None = None
) -> Image:
    """Open the image a reference names; close it (or use ``with``) when done.

    ``platform`` (``os/arch[/variant]``) picks a manifest of a multi-platform image; the
    default is this host's. Raises :class:`~graphdrivers.image.model.ImageNotFound` (a
    missing path), :class:`~graphdrivers.image.model.TagNotFound` (the message lists the
    tags there are) or :class:`~graphdrivers.errors.InvalidArchive` (not a valid image).
    """
    path, chosen_tag = parse_reference(source, tag)
    files = open_source_files(path)
    try:
        if oci.is_layout(files):
            return oci.read_layout(files, chosen_tag, want_platform=platform)
        if docker.is_docker_archive(files):
            return docker.read_archive(files, chosen_tag)
        raise InvalidArchive(
            f"{path} is neither an OCI image layout (no {oci.LAYOUT_FILE} and "
            f"{oci.INDEX_FILE}) nor a docker save archive (no {docker.MANIFEST_FILE})",
            path=str(path),
        )
    except BaseException:
        files.close()
        raise
