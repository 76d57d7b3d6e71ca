"""The tar format, as far as layers use it: header encoding and a streaming, capped reader.

Our own writer and reader instead of :mod:`tarfile`, for three reasons: the writer must produce
byte-identical output for the same tree (fixed field layout, sorted PAX records, no uname, no
atime); the reader must enforce caps on names and extended headers *before* buffering them
(``tarfile`` reads a whole PAX header or GNU long name into memory first); and both must stream
member data in chunks.

Written form (PAX, as OCI layers use): a ustar header per entry, preceded by a PAX extended
header (typeflag ``x``) only when a field does not fit ustar: a path or link target longer than
100 bytes or not ASCII, a uid/gid/size too large for its octal field, an mtime with nanoseconds
or before 1970, and xattrs (``SCHILY.xattr.<name>``). The archive ends with two zero blocks.

Read forms: ustar/PAX (``x`` and global ``g`` headers; ``SCHILY.xattr.*`` and base64
``LIBARCHIVE.xattr.*`` xattrs), GNU (``L``/``K`` long names, base-256 numbers) and v7. GNU
sparse members (typeflag ``S``, ``GNU.sparse.*`` records) and multi-volume parts are refused.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import struct
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from graphdrivers.errors import InvalidArchive

log = logging.getLogger(__name__)

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
ZERO_BLOCK = bytes(BLOCK)
READ_CHUNK = 1 << 20
USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
PAX_HEADER_NAME = b"././@PaxHeader"

REGTYPE = b"0"
AREGTYPE = b"\x00"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
PAX_X = b"x"
PAX_G = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
MEMBER_TYPES = frozenset({REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE})

SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
NS_PER_SECOND = 1_000_000_000
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777


@dataclasses.dataclass(slots=True)
class TarEntry:
    """One member as a layer needs it; names are decoded with ``os.fsdecode``."""

    name: str
    type: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------- writing


def byte_sum(block: bytes) -> int:
    """The sum of the bytes of a 512-byte block (a tar header checksum), computed in C.

    The low 16 bits of an Adler-32 are 1 plus the byte sum modulo 65521. A 256-byte half sums
    to at most 65280, below the modulus, so each half's sum is exact.
    """
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated zero-padded octal field of ``width`` bytes."""
    return b"%0*o\x00" % (width - 1, value)


def _number(value: int, width: int) -> bytes:
    """Octal when it fits, else GNU base-256 (used for device numbers only)."""
    if 0 <= value < 8 ** (width - 1):
        return _octal(value, width)
    return b"\x80" + value.to_bytes(width - 1, "big")


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def format_pax_time(ns: int) -> bytes:
    sign = "-" if ns < 0 else ""
    seconds, frac = divmod(abs(ns), NS_PER_SECOND)
    return f"{sign}{seconds}.{frac:09d}".encode()


_USTAR_LAYOUT = (
    b"%s%07o\x00%07o\x00%07o\x00%011o\x00%011o\x00        %s%s" + USTAR_MAGIC + bytes(64) + b"%s%s"
)
_PAX_BLOCKS: dict[int, bytes] = {}


def _ustar_block(
    name: bytes,
    typeflag: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """One ustar header block; uname, gname and prefix are left empty."""
    block = _USTAR_LAYOUT % (
        name[:100].ljust(100, b"\x00"),
        mode,
        uid,
        gid,
        size,
        mtime,
        typeflag,
        linkname[:100].ljust(100, b"\x00"),
        _number(devmajor, 8),
        _number(devminor, 8),
    )
    block += bytes(BLOCK - len(block))
    return b"%s%06o\x00 %s" % (block[:148], byte_sum(block), block[156:])


def _pax_block(size: int) -> bytes:
    """The ustar block that announces a PAX header of ``size`` bytes (memoized: it is fixed)."""
    block = _PAX_BLOCKS.get(size)
    if block is None:
        block = _ustar_block(PAX_HEADER_NAME, PAX_X, mode=0o644, uid=0, gid=0, size=size, mtime=0)
        if len(_PAX_BLOCKS) < 4096:
            _PAX_BLOCKS[size] = block
    return block


def encode_header(entry: TarEntry) -> bytes:
    """The header block(s) of ``entry``: a PAX header when needed, then the ustar block."""
    name = os.fsencode(entry.name)
    link = os.fsencode(entry.linkname)
    pax: dict[str, bytes] = {}

    if len(name) > 100 or not name.isascii():
        pax["path"] = name
    if len(link) > 100 or not link.isascii():
        pax["linkpath"] = link
    for key in ("path", "linkpath"):
        if key in pax and not _is_utf8(pax[key]):
            pax["hdrcharset"] = b"BINARY"
    uid, gid, size = entry.uid, entry.gid, entry.size
    if uid > _MAX_OCTAL_7:
        pax["uid"], uid = str(uid).encode(), 0
    if gid > _MAX_OCTAL_7:
        pax["gid"], gid = str(gid).encode(), 0
    if size > _MAX_OCTAL_11:
        pax["size"], size = str(size).encode(), 0
    seconds = entry.mtime_ns // NS_PER_SECOND
    if entry.mtime_ns % NS_PER_SECOND or not 0 <= seconds <= _MAX_OCTAL_11:
        pax["mtime"] = format_pax_time(entry.mtime_ns)
        seconds = min(max(seconds, 0), _MAX_OCTAL_11)
    for key, value in entry.xattrs.items():
        pax[SCHILY_XATTR + key] = value

    block = _ustar_block(
        name,
        entry.type,
        mode=entry.mode,
        uid=uid,
        gid=gid,
        size=size,
        mtime=seconds,
        linkname=link,
        devmajor=entry.devmajor,
        devminor=entry.devminor,
    )
    if not pax:
        return block
    records = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    return _pax_block(len(records)) + records + padding(len(records)) + block


_PADDINGS = tuple(bytes(n) for n in range(BLOCK))


def padding(size: int) -> bytes:
    """Zero bytes that bring ``size`` up to a whole block."""
    return _PADDINGS[-size % BLOCK]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """Caps a reader enforces before it buffers or accepts anything (see ApplyOptions)."""

    max_bytes: int
    max_entries: int
    max_name_bytes: int
    max_pax_bytes: int


class _Input:
    """Exact-length reads from a stream, counting every byte pulled against ``max_bytes``."""

    def __init__(self, raw: BinaryIO, max_bytes: int) -> None:
        self._raw = raw
        self._max = max_bytes
        self._buf = b""
        self._pos = 0
        self._pulled = 0
        self.offset = 0  # bytes consumed so far, for messages

    def _pull(self, size: int) -> bytes:
        data = self._raw.read(size)
        self._pulled += len(data)
        if self._pulled > self._max:
            raise InvalidArchive(
                f"layer tar is larger than the cap of {self._max} bytes (max_bytes)",
                expected=self._max,
            )
        return data

    def read_exact(self, size: int, what: str) -> bytes:
        """``size`` bytes, or InvalidArchive saying the stream ends inside ``what``."""
        end = self._pos + size
        if end <= len(self._buf):
            data = self._buf[self._pos : end]
            self._pos = end
            self.offset += size
            return data

        parts = [self._buf[self._pos :]]
        got = len(parts[0])
        while got < size:
            piece = self._pull(max(READ_CHUNK, size - got))
            if not piece:
                raise InvalidArchive(
                    f"layer tar is truncated: it ends inside {what} at byte {self.offset + got}"
                )
            parts.append(piece)
            got += len(piece)
        joined = b"".join(parts)
        self._buf, self._pos = joined, size
        self.offset += size
        return joined[:size]

    def read_span(self, limit: int, what: str) -> tuple[bytes, int, int]:
        """Between 1 and ``limit`` bytes as ``(buffer, start, end)``, without copying them.

        Raises InvalidArchive at the end of the stream.
        """
        avail = len(self._buf) - self._pos
        if avail:
            start = self._pos
            n = min(avail, limit)
            self._pos += n
            self.offset += n
            return self._buf, start, start + n
        piece = self._pull(min(limit, READ_CHUNK))
        if not piece:
            raise InvalidArchive(
                f"layer tar is truncated: it ends inside {what} at byte {self.offset}"
            )
        self.offset += len(piece)
        return piece, 0, len(piece)

    def at_eof(self) -> bool:
        """True if no byte is left (reading ahead into the buffer to find out)."""
        if len(self._buf) > self._pos:
            return False
        self._buf, self._pos = self._pull(READ_CHUNK), 0
        return not self._buf


def _parse_number(field: bytes, what: str) -> int:
    """An octal (NUL/space padded) or GNU base-256 header number."""
    try:
        return int(field.strip(b"\x00 "), 8)
    except ValueError:
        pass
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise InvalidArchive(f"bad tar header: {what} field {field!r} is not a number") from exc


def _cstring(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _check_checksum(block: bytes, offset: int) -> None:
    stored = _parse_number(block[148:156], "checksum")
    field = block[148:156]
    unsigned = byte_sum(block) - sum(field) + 256
    if stored == unsigned:
        return
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored != signed:
        raise InvalidArchive(f"bad tar header checksum at byte {offset}: not a tar stream?")


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record area with NULs
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise InvalidArchive(f"bad PAX record length at byte {offset + pos}") from exc
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise InvalidArchive(f"bad PAX record at byte {offset + pos}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def _parse_pax_time(value: bytes) -> int:
    """A PAX time (``[-]seconds[.fraction]``) in nanoseconds."""
    negative = value.startswith(b"-")
    whole, _, frac = value.lstrip(b"-").partition(b".")
    try:
        ns = int(whole or b"0") * NS_PER_SECOND + int(frac[:9].ljust(9, b"0"))
    except ValueError as exc:
        raise InvalidArchive(f"bad PAX time {value!r}") from exc
    return -ns if negative else ns


_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


class TarReader:
    """Iterate the members of a tar stream; read each member's data with :meth:`data`.

    Data not read before the next iteration step is skipped. Every cap in ``limits`` is checked
    before the bytes it guards are buffered.
    """

    def __init__(self, stream: BinaryIO, limits: ReadLimits) -> None:
        self._in = _Input(stream, limits.max_bytes)
        self._limits = limits
        self._global: dict[str, bytes] = {}
        self._remaining = 0
        self._pad = 0
        self.entries = 0

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            while self._remaining:
                self._skip_data()
            entry = self._next_entry()
            if entry is None:
                return
            self._remaining = entry.size
            self._pad = -entry.size % BLOCK
            yield entry

    def data(self) -> Iterator[bytes]:
        """The current member's data, in chunks of at most :data:`READ_CHUNK` bytes."""
        for buf, start, end in self.spans():
            yield buf[start:end]

    def spans(self) -> Iterator[tuple[bytes, int, int]]:
        """The current member's data as ``(buffer, start, end)`` pieces, not copied."""
        read_span = self._in.read_span
        while self._remaining:
            span = read_span(min(self._remaining, READ_CHUNK), "member data")
            self._remaining -= span[2] - span[1]
            yield span

    def _skip_data(self) -> None:
        _, start, end = self._in.read_span(min(self._remaining, READ_CHUNK), "member data")
        self._remaining -= end - start

    def _read_block(self) -> bytes | None:
        """The next header block (after the last member's padding), or None at the end."""
        pad, self._pad = self._pad, 0
        offset = self._in.offset + pad
        if self._in.at_eof():
            raise InvalidArchive(
                f"layer tar ends at byte {offset} without its end-of-archive marker "
                "(truncated, or not a tar stream)"
            )
        block = self._in.read_exact(pad + BLOCK, "a header")
        if pad:
            block = block[pad:]
        if block == ZERO_BLOCK:
            return None
        _check_checksum(block, offset)
        return block

    def _read_extension(self, size: int, cap: int, what: str) -> bytes:
        if size > cap:
            raise InvalidArchive(
                f"{what} of {size} bytes is over the cap of {cap} bytes", expected=cap, got=size
            )
        return self._in.read_exact(size + -size % BLOCK, what)[:size]

    def _next_entry(self) -> TarEntry | None:
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        limits = self._limits

        while True:
            offset = self._in.offset + self._pad
            block = self._read_block()
            if block is None:
                return None
            fields = _HEADER.unpack(block)
            typeflag = fields[7]
            size = _parse_number(fields[4], "size")
            if size < 0:
                raise InvalidArchive(f"negative member size at byte {offset}")

            if typeflag in (PAX_X, PAX_G):
                data = self._read_extension(size, limits.max_pax_bytes, "a PAX header")
                records = _parse_pax(data, offset)
                if typeflag == PAX_G:
                    self._global.update(records)
                else:
                    pax.update(records)
            elif typeflag in (GNU_LONGNAME, GNU_LONGLINK):
                data = self._read_extension(size, limits.max_name_bytes, "a GNU long name")
                if typeflag == GNU_LONGNAME:
                    long_name = _cstring(data)
                else:
                    long_link = _cstring(data)
            else:
                self.entries += 1
                if self.entries > limits.max_entries:
                    raise InvalidArchive(
                        f"layer tar has more than {limits.max_entries} entries (max_entries)",
                        expected=limits.max_entries,
                    )
                if self._global:
                    pax = {**self._global, **pax}
                return self._member(fields, typeflag, size, pax, long_name, long_link, offset)

    def _member(
        self,
        fields: tuple[bytes, ...],
        typeflag: bytes,
        size: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
        offset: int,
    ) -> TarEntry:
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = _cstring(fields[0])
            if fields[9] == USTAR_MAGIC and fields[14][0]:
                name = _cstring(fields[14]) + b"/" + name
        if "linkpath" in pax:
            link = pax["linkpath"]
        else:
            link = long_link if long_link is not None else _cstring(fields[8])
        cap = self._limits.max_name_bytes
        for what, value in (("name", name), ("link target", link)):
            if len(value) > cap:
                raise InvalidArchive(
                    f"entry {what} of {len(value)} bytes is over the cap of {cap} "
                    "(max_name_bytes)",
                    expected=cap,
                    got=len(value),
                )

        if typeflag == AREGTYPE and name.endswith(b"/"):
            typeflag = DIRTYPE
        elif typeflag in (AREGTYPE, CONTTYPE):
            typeflag = REGTYPE
        if typeflag not in MEMBER_TYPES:
            kind = "GNU sparse" if typeflag == GNU_SPARSE else "unsupported"
            raise InvalidArchive(
                f"entry {name!r} at byte {offset} has {kind} tar type {typeflag!r}"
            )

        entry = TarEntry(
            os.fsdecode(name),
            typeflag,
            _parse_number(fields[1], "mode") & 0o7777,
            _parse_number(fields[2], "uid"),
            _parse_number(fields[3], "gid"),
            size,
            _parse_number(fields[5], "mtime") * NS_PER_SECOND,
            None,
            os.fsdecode(link) if link else "",
        )
        if typeflag in (CHRTYPE, BLKTYPE):
            entry.devmajor = _parse_number(fields[12], "devmajor")
            entry.devminor = _parse_number(fields[13], "devminor")
        if pax:
            _apply_pax(entry, pax)
        if entry.size < 0:
            raise InvalidArchive(f"entry {entry.name!r} has a negative size")
        if entry.type != REGTYPE:
            entry.size = 0  # header-only types carry no data, whatever the field says
        return entry


def _apply_pax(entry: TarEntry, pax: dict[str, bytes]) -> None:
    for key, value in pax.items():
        if key in ("uid", "gid", "size"):
            try:
                number = int(value)
            except ValueError as exc:
                raise InvalidArchive(f"entry {entry.name!r}: bad PAX {key} {value!r}") from exc
            setattr(entry, key, number)
        elif key == "mtime":
            entry.mtime_ns = _parse_pax_time(value)
        elif key == "atime":
            entry.atime_ns = _parse_pax_time(value)
        elif key.startswith(SCHILY_XATTR):
            entry.xattrs[key[len(SCHILY_XATTR) :]] = value
        elif key.startswith("GNU.sparse."):
            raise InvalidArchive(f"entry {entry.name!r}: GNU sparse members are not supported")
        elif key.startswith(LIBARCHIVE_XATTR):
            xname = urllib.parse.unquote(key[len(LIBARCHIVE_XATTR) :])
            try:
                entry.xattrs[xname] = base64.b64decode(value, validate=False)
            except ValueError as exc:
                raise InvalidArchive(f"entry {entry.name!r}: bad base64 xattr {xname}") from exc
