"""Writing changes as an OCI layer tar (the diff side of every driver).

:func:`export_changes` turns a change list (:func:`~graphdrivers.archive.changes_dirs`) into an
uncompressed PAX tar, in the order of the sorted paths:

- Add and Modify: the entry as it is now. Directories are named with a trailing ``/``;
  symlinks carry their target verbatim; FIFOs and character/block devices their numbers.
  Sockets cannot be put in a tar and are skipped (logged at debug level).
- Delete: an empty regular file ``.wh.<name>`` in the deleted name's directory, mode 0600,
  owner 0:0, mtime 0, at the place the deleted path sorts.
- Hardlinks: the first name of an inode (in path order) is written with its content; each
  later name of the same inode in this change list is a hardlink entry (typeflag ``1``, size 0)
  to it. A name whose other names are not in the change list is written as a plain file.
- xattrs (:mod:`graphdrivers.archive.xattrs`) as ``SCHILY.xattr.<name>`` records, sorted.
- Owners are numeric only (uname/gname empty); times are the mtime alone, with a PAX ``mtime``
  record only when it has nanoseconds.

The same tree gives the same bytes every time, so layer digests are stable. File contents are
streamed in chunks of 1 MiB, whatever the file size. A file whose size changes while it is read
cannot corrupt the stream: the data written is exactly the size in its header (cut short, or
padded with zeros), and a warning is logged.

Paths are reached through directory descriptors from the root without following any symlink
(:class:`~graphdrivers.archive.confine.DirResolver` with ``follow=False``), and a file is read
only after ``fstat`` of the opened descriptor shows the regular file that was listed, so a tree
that someone changes during the export can never make us read outside it or block on a FIFO.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from graphdrivers.archive import tarformat as tf
from graphdrivers.archive.confine import DirResolver, NotADirectory
from graphdrivers.archive.xattrs import read_fd_xattrs, read_layer_xattrs
from graphdrivers.whiteout import whiteout_name

if TYPE_CHECKING:
    from graphdrivers.driver import Change

log = logging.getLogger(__name__)

WHITEOUT_MODE = 0o600
FILE_CHUNK = 1 << 20
FLUSH_AT = 1 << 20
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def export_tree(root: Path) -> Iterator[bytes]:
    """A layer tar of the whole tree under ``root`` (every entry an Add)."""
    from graphdrivers.archive.changes import changes_dirs

    return export_changes(root, changes_dirs(root, None))


def export_changes(root: Path, changes: Sequence[Change]) -> Iterator[bytes]:
    """Yield the layer tar of ``changes`` to the tree at ``root`` (see the module docstring)."""
    from graphdrivers.driver import Kind

    pending: list[bytes] = []
    pending_size = 0
    links: dict[tuple[int, int], str] = {}

    with DirResolver(root, follow=False) as resolver:
        for change in sorted(changes, key=lambda c: c.path):
            parts = tuple(p for p in change.path.split("/") if p)
            if not parts:
                continue
            if change.kind is Kind.DELETE:
                pieces: Iterator[bytes] = iter((_whiteout_header(parts),))
            else:
                pieces = _entry(resolver, parts, links)

            for piece in pieces:
                if len(piece) >= FLUSH_AT:
                    if pending:
                        yield b"".join(pending)
                        pending, pending_size = [], 0
                    yield piece
                    continue
                pending.append(piece)
                pending_size += len(piece)
                if pending_size >= FLUSH_AT:
                    yield b"".join(pending)
                    pending, pending_size = [], 0
            resolver.trim()

    pending.append(tf.END_OF_ARCHIVE)
    yield b"".join(pending)


def _whiteout_header(parts: tuple[str, ...]) -> bytes:
    name = "/".join((*parts[:-1], whiteout_name(parts[-1])))
    return tf.encode_header(tf.TarEntry(name=name, type=tf.REGTYPE, mode=WHITEOUT_MODE))


def _entry(
    resolver: DirResolver, parts: tuple[str, ...], links: dict[tuple[int, int], str]
) -> Iterator[bytes]:
    """The header (and data) of the entry at ``parts``, or nothing if it vanished."""
    rel = "/".join(parts)
    try:
        found = resolver.dir(parts[:-1])
        if found is None:
            raise FileNotFoundError(rel)
        dir_fd, name = found[0], parts[-1]
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectory):
        log.warning("export: /%s vanished or changed type during the export; skipped", rel)
        return

    mode = st.st_mode
    entry = tf.TarEntry(
        name=rel,
        type=tf.REGTYPE,
        mode=stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
    )
    if stat.S_ISSOCK(mode):
        log.debug("export: /%s is a socket, which a tar cannot hold; skipped", rel)
        return
    if not stat.S_ISREG(mode):  # a regular file's are read through its descriptor
        entry.xattrs = read_layer_xattrs(dir_fd, name)

    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        first = links.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            entry.type, entry.linkname, entry.xattrs = tf.LNKTYPE, first, {}
            yield tf.encode_header(entry)
            return

    if stat.S_ISREG(mode):
        yield from _regular(dir_fd, name, rel, st, entry)
        return
    if stat.S_ISDIR(mode):
        entry.type, entry.name = tf.DIRTYPE, rel + "/"
    elif stat.S_ISLNK(mode):
        entry.type, entry.linkname = tf.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISFIFO(mode):
        entry.type = tf.FIFOTYPE
    else:
        entry.type = tf.CHRTYPE if stat.S_ISCHR(mode) else tf.BLKTYPE
        entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    yield tf.encode_header(entry)


def _regular(
    dir_fd: int, name: str, rel: str, st: os.stat_result, entry: tf.TarEntry
) -> Iterator[bytes]:
    """Header, data and padding of a regular file, exactly ``st.st_size`` bytes of data."""
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, OSError) as exc:
        log.warning("export: cannot open /%s (%s); skipped", rel, exc)
        return
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            log.warning("export: /%s was replaced during the export; skipped", rel)
            return

        size = st.st_size
        entry.size = size
        entry.xattrs = read_fd_xattrs(fd)
        header = tf.encode_header(entry)
        if size < FILE_CHUNK:
            yield header
            yield _read_small(fd, size, rel)
            yield tf.padding(size)
            return

        yield header
        left = size
        shrank = False
        while left:
            data = b"" if shrank else os.read(fd, min(left, FILE_CHUNK))
            if not data:
                if not shrank:
                    log.warning("export: /%s shrank while being read; padded with zeros", rel)
                shrank = True
                data = bytes(min(left, FILE_CHUNK))
            left -= len(data)
            yield data
        if not shrank and os.read(fd, 1):
            log.warning("export: /%s grew while being read; cut to %d bytes", rel, size)
        yield tf.padding(size)
    finally:
        os.close(fd)


def _read_small(fd: int, size: int, rel: str) -> bytes:
    """All of a small file, made exactly ``size`` bytes long (see the module docstring).

    Asking for one byte more than expected tells, in the same call, whether the file grew.
    """
    data = os.read(fd, size + 1)
    if len(data) > size:
        log.warning("export: /%s grew while being read; cut to %d bytes", rel, size)
        return data[:size]
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, size - got + 1)
        if not more:
            log.warning("export: /%s shrank while being read; padded with zeros", rel)
            parts.append(bytes(size - got))
            break
        parts.append(more)
        got += len(more)
    data = b"".join(parts)
    if len(data) > size:
        log.warning("export: /%s grew while being read; cut to %d bytes", rel, size)
    return data[:size]
