"""Recognise and undo a layer tar's compression, in this process.

OCI layers are plain tar, gzip or zstd. The kind is told by the stream's first bytes (its magic
number), never by a media type or file name, and decompression runs in-process (``zlib`` through
:mod:`gzip`, and the ``zstandard`` package): no external decompressor is ever executed, so a
layer can never make us run a program it chose (CVE-2014-9357, CVE-2026-41567).

Decoding errors (a corrupt gzip member, a bad zstd frame) surface as
:class:`~graphdrivers.errors.InvalidArchive` when the returned stream is read.
"""

from __future__ import annotations

import enum
import gzip
import io
import logging
import zlib
from typing import Any, BinaryIO, cast

import zstandard

from graphdrivers.errors import InvalidArchive

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
MAGIC_BYTES = 6


class Compression(enum.StrEnum):
    """The compressions a layer tar may use."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


def detect_compression(head: bytes) -> Compression:
    """Tell the compression from the first bytes of a stream.

    xz and bzip2 are recognised only to refuse them with a clear message: OCI layers do not use
    them.
    """
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    if head.startswith(XZ_MAGIC) or head.startswith(BZIP2_MAGIC):
        kind = "xz" if head.startswith(XZ_MAGIC) else "bzip2"
        raise InvalidArchive(
            f"layer is {kind}-compressed; only plain, gzip and zstd layer tars are accepted"
        )
    return Compression.NONE


class _PrefixedReader(io.RawIOBase):
    """Give back bytes already read (the magic number) before the rest of ``raw``."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        super().__init__()
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        if self._prefix:
            n = min(len(out), len(self._prefix))
            out[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._raw.read(len(out))
        out[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                data, self._prefix = self._prefix + self._raw.read(), b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._raw.read(-1 if size is None else size)


class _DecodeErrors(io.RawIOBase):
    """Turn a decompressor's own exceptions into InvalidArchive."""

    def __init__(self, inner: Any, kind: Compression) -> None:
        super().__init__()
        self._inner = inner
        self._kind = kind

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            data: bytes = self._inner.read(-1 if size is None else size)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise InvalidArchive(f"corrupt {self._kind} layer stream: {exc}") from exc
        return data

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        data = self.read(len(out))
        out[: len(data)] = data
        return len(data)


def open_layer_stream(stream: BinaryIO) -> BinaryIO:
    """Return a stream of the uncompressed tar bytes of ``stream`` (plain, gzip or zstd)."""
    head = _read_head(stream)
    kind = detect_compression(head)
    source = cast(BinaryIO, _PrefixedReader(head, stream))
    log.debug("layer stream compression: %s", kind)

    if kind is Compression.GZIP:
        inner: Any = gzip.GzipFile(fileobj=source, mode="rb")
    elif kind is Compression.ZSTD:
        dctx = zstandard.ZstdDecompressor()
        inner = dctx.stream_reader(source, read_size=1 << 20, read_across_frames=True)
    else:
        return source
    return cast(BinaryIO, _DecodeErrors(inner, kind))


def _read_head(stream: BinaryIO) -> bytes:
    head = b""
    while len(head) < MAGIC_BYTES:
        piece = stream.read(MAGIC_BYTES - len(head))
        if not piece:
            break
        head += piece
    return head
