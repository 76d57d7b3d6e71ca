"""Content digests (``sha256:<hex>``), chain ids, and the stream that checks a layer as it is read.

An OCI image names every blob by the sha256 of its bytes as stored (compressed for a gzip
layer) and records in its config each layer's *diff id*: the sha256 of the uncompressed layer
tar. A layer's *chain id* names the whole stack up to it::

    chain_id(L0) = diff_id(L0)
    chain_id(Ln) = sha256("<chain_id(Ln-1)> <diff_id(Ln)>")

so two images that share their bottom layers share those chain ids, whatever compression or
manifest they came in.

:class:`LayerStream` is what :func:`graphdrivers.image.import_image` hands to
``Driver.apply_diff``: it reads a stored blob, checks the blob's size and digest, decompresses
it, and checks the diff id, raising :class:`~graphdrivers.errors.InvalidArchive` *before* the
tar reader can see the end of the layer. ``apply_diff`` then rolls the layer back, so a blob
that does not match its digest never becomes a layer.

Why "before the end" needs care: a tar reader stops at the end-of-archive marker (zero
blocks) and need not read the stream to EOF, so a check done only at EOF might never run.
:class:`LayerStream` therefore holds back every run of zero bytes at the tail of what it has
decompressed so far (as a count, not as bytes) and releases it only when a non-zero byte
follows or when the blob has been read to its end and verified. The tar reader cannot see its
end-of-archive marker until then. Bytes that follow a tar's end marker could still let a
reader finish early, so the importer also drains the stream after ``apply_diff`` returns (see
:meth:`LayerStream.finish`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import zlib
from collections.abc import Callable
from typing import IO, NewType, Protocol

import zstandard

from graphdrivers.archive.compression import Compression
from graphdrivers.errors import InvalidArchive

log = logging.getLogger(__name__)

Digest = NewType("Digest", str)

SHA256 = "sha256"
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
CHUNK_SIZE = 1 << 16
ZSTD_INPUT_SLICE = 512

Progress = Callable[[int], None]


class Reader(Protocol):
    """What :class:`LayerStream` reads a blob from: any binary file opened for reading."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class Writer(Protocol):
    """What :func:`open_compressed_writer` returns."""

    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


def parse_digest(value: object, *, what: str = "digest") -> Digest:
    """Return ``value`` as a :data:`Digest` if it is ``sha256:`` and 64 lowercase hex digits."""
    if not isinstance(value, str) or not DIGEST_PATTERN.fullmatch(value):
        raise InvalidArchive(
            f"{what} {value!r} is not a sha256 digest ('sha256:' and 64 lowercase hex digits); "
            "other algorithms are not supported",
            got=value,
        )
    return Digest(value)


def digest_hex(digest: Digest) -> str:
    """``sha256:abc...`` -> ``abc...``."""
    return digest.partition(":")[2]


def sha256_digest(data: bytes) -> Digest:
    return Digest(f"{SHA256}:{hashlib.sha256(data).hexdigest()}")


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    """The chain id of each layer of a stack, given the diff ids bottom to top."""
    chain: list[Digest] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append(sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


def verify_blob(data: bytes, digest: Digest, size: int | None, *, name: str) -> bytes:
    """Check a small blob read whole (an index, manifest or config) and return it."""
    if size is not None and len(data) != size:
        raise InvalidArchive(
            f"blob {name} is {len(data)} bytes, its descriptor says {size}",
            path=name,
            expected=size,
            got=len(data),
        )
    got = sha256_digest(data)
    if got != digest:
        raise InvalidArchive(
            f"blob {name} does not match its digest: expected {digest}, got {got}",
            path=name,
            expected=digest,
            got=got,
        )
    return data


class _Decompressor:
    """Incremental decompression with a bound on the output of each call."""

    def __init__(self, compression: Compression, name: str) -> None:
        self.compression = compression
        self.name = name
        self._zlib: zlib._Decompress | None = None
        self._zstd: zstandard.ZstdDecompressionObj | None = None
        self._pending = b""  # compressed input not consumed yet
        self._members = 0
        self._new_member()

    def _new_member(self) -> None:
        if self.compression is Compression.GZIP:
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.compression is Compression.ZSTD:
            self._zstd = zstandard.ZstdDecompressor().decompressobj()
        self._members += 1

    def feed(self, data: bytes) -> None:
        self._pending += data

    def has_input(self) -> bool:
        return bool(self._pending)

    def take(self, limit: int) -> bytes:
        """Decompress some pending input into at most about ``limit`` bytes."""
        data, self._pending = self._pending, b""
        if self.compression is Compression.NONE or not data:
            return data
        try:
            if self._zlib is not None:
                return self._take_gzip(data, limit)
            return self._take_zstd(data)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise InvalidArchive(
                f"layer blob {self.name} is not valid {self.compression}: {exc}", path=self.name
            ) from exc

    def _take_gzip(self, data: bytes, limit: int) -> bytes:
        assert self._zlib is not None
        if self._zlib.eof:  # a gzip file may hold several members, and zero padding
            data = data.lstrip(b"\0")
            if not data:
                return b""
            self._new_member()
        out = self._zlib.decompress(data, limit)
        self._pending = self._zlib.unconsumed_tail + self._zlib.unused_data
        return out

    def _take_zstd(self, data: bytes) -> bytes:
        # zstd's decompressobj has no output limit, so it gets small slices of input: even
        # run-length blocks (4 bytes -> 128 KiB) then inflate one call to 16 MiB at most.
        assert self._zstd is not None
        if self._zstd.eof:
            self._new_member()
        piece, rest = data[:ZSTD_INPUT_SLICE], data[ZSTD_INPUT_SLICE:]
        out = self._zstd.decompress(piece)
        self._pending = self._zstd.unused_data + rest
        return out

    def finished(self) -> bool:
        """True if the input ended at the end of a complete stream."""
        if self.compression is Compression.GZIP:
            return self._zlib is not None and self._zlib.eof and not self._pending
        if self.compression is Compression.ZSTD:
            return self._zstd is not None and self._zstd.eof and not self._pending
        return True


class LayerStream(io.RawIOBase):
    """A stored layer blob, read as an uncompressed layer tar whose digests are checked.

    ``digest``/``size`` describe the blob as stored (None when the source does not name them,
    as in a ``docker save`` archive); ``diff_id`` is the digest of the uncompressed tar (None if
    the image's config records none). ``progress`` is called with the count of blob bytes read
    by each read. Every failure raises :class:`InvalidArchive` naming ``name``.
    """

    def __init__(
        self,
        raw: Reader,
        *,
        name: str,
        compression: Compression,
        digest: Digest | None = None,
        size: int | None = None,
        diff_id: Digest | None = None,
        progress: Progress | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self._raw = raw
        self._digest = digest
        self._size = size
        self._diff_id = diff_id
        self._progress = progress
        self._blob_hash = hashlib.sha256()
        self._tar_hash = hashlib.sha256()
        self._decompressor = _Decompressor(compression, name)
        self.blob_bytes = 0
        self.tar_bytes = 0
        self._lead = 0  # zero bytes the reader may have, before _ready
        self._ready = b""  # decompressed bytes the reader may have
        self._zeros = 0  # a run of zero bytes held back at the tail (see the module docstring)
        self._eof = False  # the blob was read to its end and verified

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = len(buffer)
        while not self._lead and not self._ready:
            if self._eof:  # verified: the held-back zeros may go now
                if not self._zeros:
                    return 0
                self._lead, self._zeros = self._zeros, 0
            else:
                self._fill()

        if self._lead:
            n = min(self._lead, want)
            buffer[:n] = bytes(n)
            self._lead -= n
            return n
        data, self._ready = self._ready[:want], self._ready[want:]
        buffer[: len(data)] = data
        return len(data)

    def _fill(self) -> None:
        """Read and decompress one step; this may make no bytes ready (call again)."""
        if not self._decompressor.has_input():
            chunk = self._raw.read(CHUNK_SIZE)
            if not chunk:
                self._end_of_blob()
                return
            self._blob_hash.update(chunk)
            self.blob_bytes += len(chunk)
            self._check_size_so_far()
            if self._progress is not None:
                self._progress(len(chunk))
            self._decompressor.feed(chunk)

        out = self._decompressor.take(CHUNK_SIZE)
        self._tar_hash.update(out)
        self.tar_bytes += len(out)

        body = out.rstrip(b"\0")
        if not body:  # all zeros (or nothing): the held-back run grows
            self._zeros += len(out)
            return
        self._lead, self._ready = self._zeros, body
        self._zeros = len(out) - len(body)

    def _check_size_so_far(self) -> None:
        if self._size is not None and self.blob_bytes > self._size:
            raise InvalidArchive(
                f"layer blob {self.name} is longer than the {self._size} bytes its descriptor "
                "says",
                path=self.name,
                expected=self._size,
            )

    def _end_of_blob(self) -> None:
        """The blob ended: check everything before any held-back byte is released."""
        if self._size is not None and self.blob_bytes != self._size:
            raise InvalidArchive(
                f"layer blob {self.name} is {self.blob_bytes} bytes, its descriptor says "
                f"{self._size}",
                path=self.name,
                expected=self._size,
                got=self.blob_bytes,
            )
        got = Digest(f"{SHA256}:{self._blob_hash.hexdigest()}")
        if self._digest is not None and got != self._digest:
            raise InvalidArchive(
                f"layer blob {self.name} does not match its digest: expected {self._digest}, "
                f"got {got}",
                path=self.name,
                expected=self._digest,
                got=got,
            )
        if not self._decompressor.finished():
            raise InvalidArchive(
                f"layer blob {self.name} ends in the middle of its "
                f"{self._decompressor.compression} stream (truncated)",
                path=self.name,
            )
        got = Digest(f"{SHA256}:{self._tar_hash.hexdigest()}")
        if self._diff_id is not None and got != self._diff_id:
            raise InvalidArchive(
                f"layer {self.name}: the uncompressed tar does not match the diff id in the "
                f"image config: expected {self._diff_id}, got {got}",
                path=self.name,
                expected=self._diff_id,
                got=got,
            )
        self._eof = True
        log.debug(
            "layer blob %s verified (%d bytes, %d uncompressed)",
            self.name,
            self.blob_bytes,
            self.tar_bytes,
        )

    def finish(self) -> Digest:
        """Read whatever the tar reader left unread, verifying the blob; return the diff id."""
        while self.read(CHUNK_SIZE):
            pass
        return Digest(f"{SHA256}:{self._tar_hash.hexdigest()}")

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def open_compressed_writer(target: IO[bytes], compression: Compression) -> Writer:
    """A writer that compresses into ``target`` reproducibly (no names or times in headers).

    Closing the returned writer finishes the compressed stream but leaves ``target`` open.
    """
    if compression is Compression.GZIP:
        return gzip.GzipFile(filename="", mode="wb", fileobj=target, mtime=0, compresslevel=6)
    if compression is Compression.ZSTD:
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        return cctx.stream_writer(target, closefd=False)
    return _Unclosing(target)


class _Unclosing(io.RawIOBase):
    """Writes through to a file and leaves it open on close (the uncompressed case)."""

    def __init__(self, target: IO[bytes]) -> None:
        super().__init__()
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._target.write(data)
        return len(data)
