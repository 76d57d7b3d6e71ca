"""Building layer tars entry by entry, including the malformed and hostile ones.

The checks need tars no well-behaved tool writes: names with ``..``, absolute names, hardlinks
out of the root, whiteouts with empty names, entries named ``""``. :class:`TarBuilder` writes
exactly the headers it is told to (PAX format, so long names and xattrs fit) and never looks at
the local filesystem.
"""

from __future__ import annotations

import io
import tarfile


class TarBuilder:
    """An in-memory tar stream built one entry at a time."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.TarFile(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> TarBuilder:
        info.size = len(data) if data is not None else 0
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    @staticmethod
    def _info(
        name: str,
        kind: bytes,
        mode: int,
        uid: int,
        gid: int,
        mtime: float,
        xattrs: dict[str, str] | None = None,
    ) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = mtime
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        return info

    def file(
        self,
        name: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 1_600_000_000,
        xattrs: dict[str, str] | None = None,
    ) -> TarBuilder:
        return self._add(self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs), data)

    def dir(
        self,
        name: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 1_600_000_000,
    ) -> TarBuilder:
        return self._add(self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime))

    def symlink(
        self,
        name: str,
        target: str,
        *,
        mode: int = 0o777,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 1_600_000_000,
    ) -> TarBuilder:
        info = self._info(name, tarfile.SYMTYPE, mode, uid, gid, mtime)
        info.linkname = target
        return self._add(info)

    def hardlink(self, name: str, target: str, *, mode: int = 0o644) -> TarBuilder:
        info = self._info(name, tarfile.LNKTYPE, mode, 0, 0, 1_600_000_000)
        info.linkname = target
        return self._add(info)

    def fifo(self, name: str, *, mode: int = 0o644) -> TarBuilder:
        return self._add(self._info(name, tarfile.FIFOTYPE, mode, 0, 0, 1_600_000_000))

    def device(
        self, name: str, major: int, minor: int, *, block: bool = False, mode: int = 0o666
    ) -> TarBuilder:
        kind = tarfile.BLKTYPE if block else tarfile.CHRTYPE
        info = self._info(name, kind, mode, 0, 0, 1_600_000_000)
        info.devmajor, info.devminor = major, minor
        return self._add(info)

    def to_bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def tar_names(data: bytes) -> list[str]:
    """The entry names of a tar stream, in stream order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [m.name for m in tar.getmembers()]


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    """The headers of a tar stream, in stream order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()
