"""What an image source yields once read: its layers bottom to top, its config, and its blobs.

Both source formats (:mod:`~graphdrivers.image.oci` and :mod:`~graphdrivers.image.docker`)
reduce to one :class:`Image`. Their files are reached through a :class:`SourceFiles`, which is
either a directory (:class:`DirFiles`) or a tar read in place (:class:`TarFiles`, random access
into an uncompressed tar, nothing unpacked to disk), so either format may come as either.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import posixpath
import tarfile
from pathlib import Path
from typing import IO, Any

from graphdrivers.archive.compression import MAGIC_BYTES, Compression, detect_compression
from graphdrivers.errors import DriverError, InvalidArchive
from graphdrivers.image.digest import Digest, LayerStream, Progress, Reader

log = logging.getLogger(__name__)

# A small JSON file (index, manifest, config) bigger than this is refused, not read whole.
MAX_JSON_BYTES = 4 << 20


class ImageNotFound(DriverError, LookupError):
    """The image source does not exist or holds no image that matches the request."""


class TagNotFound(ImageNotFound):
    """The image source has no (or more than one) image with the requested tag.

    :attr:`available` lists the tags the source does have, which the message names too.
    """

    def __init__(self, message: str, *, source: str, available: list[str]) -> None:
        super().__init__(message, path=source, got=available)
        self.available = available


class SourceFiles(abc.ABC):
    """Read access to the files of an image source by their relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def open(self, name: str) -> IO[bytes]:
        """Open a file for reading; a missing one raises :class:`InvalidArchive`."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """The size of a file in bytes; a missing one raises :class:`InvalidArchive`."""

    def close(self) -> None:
        """Release what the source holds open."""

    def describe(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_json(
        self, name: str, *, digest: Digest | None = None, size: int | None = None
    ) -> Any:
        """Read a small JSON file whole, checking its digest and size when given."""
        from graphdrivers.image.digest import verify_blob

        with self.open(name) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise InvalidArchive(
                f"{self.describe(name)} is larger than {MAX_JSON_BYTES} bytes; "
                "not a manifest, index or config",
                path=self.describe(name),
            )
        if digest is not None:
            verify_blob(data, digest, size, name=self.describe(name))
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArchive(
                f"{self.describe(name)} is not valid JSON: {exc}", path=self.describe(name)
            ) from exc


class DirFiles(SourceFiles):
    """The files of a source that is a directory."""

    def _path(self, name: str) -> Path:
        clean = posixpath.normpath(name)
        if clean.startswith(("/", "../")) or clean == "..":
            raise InvalidArchive(
                f"image names a file outside itself: {name!r}", path=str(self.root), got=name
            )
        return self.root / clean

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except OSError as exc:
            raise InvalidArchive(
                f"image file {self.describe(name)} is missing", path=self.describe(name)
            ) from exc

    def open(self, name: str) -> IO[bytes]:
        try:
            return self._path(name).open("rb")
        except FileNotFoundError as exc:
            raise InvalidArchive(
                f"image file {self.describe(name)} is missing", path=self.describe(name)
            ) from exc
        except OSError as exc:
            raise InvalidArchive(
                f"cannot read {self.describe(name)}: {exc.strerror}", path=self.describe(name)
            ) from exc


class TarFiles(SourceFiles):
    """The files of a source that is a tar (``docker save`` output, an OCI archive).

    Members are read in place: an uncompressed tar is indexed once and each member is a
    window into the file. Symlinks and hardlinks between members (old ``docker save`` archives
    link ``<id>/layer.tar`` to a shared file) are followed inside the tar.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        try:
            # Limitation: a compressed outer tar (.tar.gz) is accepted but every member read
            # restarts decompression from the start, which is slow for big archives.
            self._tar = tarfile.open(root, "r:*")  # noqa: SIM115 (closed by close())
            self._members = {posixpath.normpath(m.name): m for m in self._tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidArchive(
                f"{root} is not a readable tar archive: {exc}", path=str(root)
            ) from exc

    def exists(self, name: str) -> bool:
        member = self._members.get(posixpath.normpath(name))
        return member is not None and (member.isfile() or member.issym() or member.islnk())

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self._members.get(posixpath.normpath(name))
        if member is None:
            raise InvalidArchive(
                f"image file {self.describe(name)} is missing", path=self.describe(name)
            )
        hops = 0
        while (member.issym() or member.islnk()) and hops < 8:  # as extractfile follows them
            target = member.linkname
            if member.issym():
                target = posixpath.join(posixpath.dirname(member.name), target)
            found = self._members.get(posixpath.normpath(target))
            if found is None:
                break
            member, hops = found, hops + 1
        if not member.isfile():
            raise InvalidArchive(
                f"{self.describe(name)} is not a regular file", path=self.describe(name)
            )
        return member

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        try:
            f = self._tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise InvalidArchive(
                f"cannot read {self.describe(name)}: {exc}", path=self.describe(name)
            ) from exc
        if f is None:
            raise InvalidArchive(
                f"{self.describe(name)} is not a regular file", path=self.describe(name)
            )
        return f

    def close(self) -> None:
        self._tar.close()


def open_source_files(path: Path) -> SourceFiles:
    """A directory or a tar file as a :class:`SourceFiles`."""
    if path.is_dir():
        return DirFiles(path)
    if path.is_file():
        return TarFiles(path)
    raise ImageNotFound(f"image {os.fspath(path)!r} does not exist", path=str(path))


@dataclasses.dataclass(frozen=True)
class LayerBlob:
    """One layer of an image as its source stores it.

    ``digest`` and ``size`` are those of the stored blob (None when the source does not name
    them); ``diff_id`` is the digest of the uncompressed tar from the image config.
    """

    name: str
    compression: Compression | None  # None: tell from the blob's first bytes
    digest: Digest | None
    size: int | None
    diff_id: Digest | None


@dataclasses.dataclass
class Image:
    """An image chosen from a source: what :func:`~graphdrivers.image.import_image` stacks."""

    source: str
    tag: str | None
    config: dict[str, Any]
    layers: list[LayerBlob]
    files: SourceFiles

    def open_layer(self, index: int, progress: Progress | None = None) -> LayerStream:
        """Layer ``index`` (0 = bottom) as a verified uncompressed tar stream."""
        blob = self.layers[index]
        raw: Reader = self.files.open(blob.name)
        compression = blob.compression
        if compression is None:
            peeked = _Peeked(raw)
            compression = detect_compression(peeked.peek(MAGIC_BYTES))
            raw = peeked
        return LayerStream(
            raw,
            name=self.files.describe(blob.name),
            compression=compression,
            digest=blob.digest,
            size=blob.size,
            diff_id=blob.diff_id,
            progress=progress,
        )

    @property
    def diff_ids(self) -> list[Digest] | None:
        """Every layer's diff id, or None if the config does not record all of them."""
        ids = [layer.diff_id for layer in self.layers]
        return None if any(d is None for d in ids) else [d for d in ids if d is not None]

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Peeked:
    """A reader whose first bytes can be looked at before it is read from the start."""

    def __init__(self, raw: Reader) -> None:
        self._raw = raw
        self._head = b""

    def peek(self, n: int = 8) -> bytes:
        while len(self._head) < n:
            more = self._raw.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(n)
        if n < 0:
            data, self._head = self._head + self._raw.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _Peeked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
