"""The native diff of a union layer: its upper dir ``diff/``, whiteouts turned into OCI ones.

A layer's ``diff/`` already holds exactly its changes against its parent, so the diff against
the direct parent needs no mount and no tree comparison: walk ``diff/`` (names sorted, so the
bytes are the same every time) and write every entry as it is, except the union's own markers,
which become the OCI layer format's:

======================================  ==================================================
in ``diff/``                            in the tar
======================================  ==================================================
char device 0/0 ``name`` (overlay)      an empty file ``.wh.name``
dir with ``*.overlay.opaque=y``         the dir, then an empty file ``dir/.wh..wh..opq``
file ``.wh.name`` (aufs)                ``.wh.name`` (dropped if ``name`` is beside it:
                                        a whiteout hides lower layers only)
file ``.wh..wh..opq`` (aufs)            ``dir/.wh..wh..opq``
other ``.wh..wh.*`` (aufs metadata)     nothing
char 0/0 ``.wh..opq`` (fuse-overlayfs)  ``dir/.wh..wh..opq`` (its opaque marker)
======================================  ==================================================

A directory's opaque marker is written once, right after the directory, whichever of these
marked it, and only where it hides something: when the layers below (``lowers``, the parent's
stack) show a directory at that path. A marker on a directory new to the stack is dropped
(kernel overlayfs with ``index=on`` marks every directory it creates in a merged one opaque),
so such a layer's native diff is byte-identical to its naive one.

Entries are written with :mod:`graphdrivers.archive.tarformat`'s headers, exactly as
:func:`graphdrivers.archive.export_changes` writes them for the naive diff (the same whiteout
header, hardlinks as typeflag ``1`` to the first name in walk order, the layer xattrs of
:mod:`graphdrivers.archive.xattrs`), so both diffs apply to the same tree. The union's own
bookkeeping xattrs are never written: the overlay namespace, and the origin fusemount records on
copied-up entries (``*.fusemount.*``), which the mount hides but ``diff/`` holds.

A walk holds one directory descriptor per level and opens names relative to it without
following symlinks, as the archive code does. ``diff/`` is read while nobody writes it (the
driver uses the naive diff while the layer is mounted writable); a file that changes size
anyway gets exactly the size of its header (cut, or padded with zeros) and a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from graphdrivers.archive import tarformat as tf
from graphdrivers.archive.xattrs import fd_path, read_layer_xattrs
from graphdrivers.whiteout import (
    INVALID_WHITEOUT_NAMES,
    OPAQUE_VALUE,
    OVERLAY_OPAQUE_XATTRS,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    is_overlay_whiteout,
    is_whiteout_name,
    whited_out_name,
    whiteout_name,
)

log = logging.getLogger(__name__)

#: a character device 0/0 of this name is how fuse-overlayfs marks an opaque dir (besides the
#: xattr and a .wh..wh..opq file, see docs/union.md)
FUSE_OVERLAYFS_OPAQUE = ".wh..opq"
#: xattrs a union filesystem keeps for itself in upper dirs (fusemount.xattrs.HIDDEN_PREFIXES)
UNION_BOOKKEEPING_XATTRS = (
    "user.overlay.",
    "trusted.overlay.",
    "user.fusemount.",
    "trusted.fusemount.",
)
WHITEOUT_MODE = 0o600  # what export_changes writes for a whiteout
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1 << 20

Links = dict[tuple[int, int], str]


def export_upper(upper: Path, lowers: Sequence[Path] = ()) -> Iterator[bytes]:
    """Yield the OCI layer tar of the upper dir ``upper`` over ``lowers`` (topmost first)."""
    pending: list[bytes] = []
    size = 0
    fd = os.open(upper, DIR_FLAGS)
    below = LowerView(lowers)
    try:
        for piece in _walk(fd, "", {}, opaque=False, below=below):
            pending.append(piece)
            size += len(piece)
            if size >= CHUNK:
                yield b"".join(pending)
                pending, size = [], 0
    finally:
        os.close(fd)
    pending.append(tf.END_OF_ARCHIVE)
    yield b"".join(pending)


def _marker(name: str) -> bytes:
    """The header of an empty whiteout or opaque-marker file, as export_changes writes it."""
    return tf.encode_header(tf.TarEntry(name=name, type=tf.REGTYPE, mode=WHITEOUT_MODE))


def _is_opaque(dir_fd: int, name: str) -> bool:
    for attr in OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(fd_path(dir_fd, name), attr, follow_symlinks=False) == OPAQUE_VALUE:
                return True
        except OSError:
            continue
    return False


class LowerView:
    """Answers whether the merged view of some layer dirs has a directory at a path.

    The layers may hold whiteouts and opaque markers of either format. Only called for opaque
    directories of the upper, so a few lstat calls per layer are all it costs.
    """

    def __init__(self, lowers: Sequence[Path]) -> None:
        self.lowers = list(lowers)

    def has_dir(self, path: str) -> bool:
        parts = [p for p in path.split("/") if p]
        for lower in self.lowers:
            shown, stop = _layer_dir(lower, parts)
            if shown or stop:
                return shown
        return False


def _layer_dir(layer: Path, parts: list[str]) -> tuple[bool, bool]:
    """(a directory at ``parts`` in ``layer``, layers below cannot show it)."""
    here = layer
    for i, part in enumerate(parts):
        try:
            st = os.lstat(here / part)
        except FileNotFoundError:
            if os.path.lexists(here / whiteout_name(part)):
                return False, True  # an aufs whiteout
            return False, False
        if not stat.S_ISDIR(st.st_mode):
            return False, True  # a whiteout, or a file hiding the path
        here = here / part
        if i + 1 < len(parts) and _dir_is_opaque(here) and not _is_dir(here / parts[i + 1]):
            return False, True  # this layer hides the rest of the path below it
    return True, False


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _dir_is_opaque(path: Path) -> bool:
    if os.path.lexists(path / WHITEOUT_OPAQUE):
        return True
    for attr in OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == OPAQUE_VALUE:
                return True
        except OSError:
            continue
    return False


def _walk(
    dir_fd: int, prefix: str, links: Links, *, opaque: bool, below: LowerView
) -> Iterator[bytes]:
    """Tar pieces of the entries of the directory ``dir_fd``, whose path is ``prefix``.

    ``opaque`` says the directory carries the opaque xattr; the marker files inside it say so
    too. Either way the tar gets one opaque marker. Entries come in the order of their full
    paths, as export_changes writes them: a subdirectory's entries (``a/x``) come after the
    siblings that sort before ``a/`` (``a.b``), and a whiteout where its name sorts.
    """
    with os.scandir(dir_fd) as it:
        entries = {e.name: e.stat(follow_symlinks=False) for e in it}

    events: list[tuple[str, str]] = []  # (sort key, name); a key ending in "/" walks into name
    fuse_marker = entries.get(FUSE_OVERLAYFS_OPAQUE)
    if (
        prefix
        and (
            opaque
            or WHITEOUT_OPAQUE in entries
            or (fuse_marker is not None and is_overlay_whiteout(fuse_marker))
        )
        and below.has_dir(prefix)
    ):
        events.append((WHITEOUT_OPAQUE, WHITEOUT_OPAQUE))
    for name, st in entries.items():
        if name == WHITEOUT_OPAQUE or (name == FUSE_OVERLAYFS_OPAQUE and is_overlay_whiteout(st)):
            continue
        if name.startswith(WHITEOUT_META_PREFIX) or name in INVALID_WHITEOUT_NAMES:
            log.debug("native diff: skipping union metadata %s%s", prefix, name)
        elif is_whiteout_name(name):
            if whited_out_name(name) not in entries:
                events.append((whited_out_name(name), name))
        else:
            events.append((name, name))
            if stat.S_ISDIR(st.st_mode):
                events.append((name + "/", name))
    events.sort()

    for key, name in events:
        if name == WHITEOUT_OPAQUE or is_whiteout_name(name):
            yield _marker(prefix + name)
        elif is_overlay_whiteout(entries[name]):
            yield _marker(prefix + whiteout_name(name))
        elif key.endswith("/"):
            yield from _subdirectory(dir_fd, name, prefix, links, below)
        elif stat.S_ISDIR(entries[name].st_mode):
            header = _entry(dir_fd, name, prefix + name + "/", tf.DIRTYPE, entries[name])
            yield tf.encode_header(header)
        else:
            yield from _non_directory(dir_fd, name, prefix + name, entries[name], links)


def _subdirectory(
    dir_fd: int, name: str, prefix: str, links: Links, below: LowerView
) -> Iterator[bytes]:
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        opaque = _is_opaque(dir_fd, name)
        yield from _walk(fd, prefix + name + "/", links, opaque=opaque, below=below)
    finally:
        os.close(fd)


def _entry(dir_fd: int, name: str, path: str, kind: bytes, st: os.stat_result) -> tf.TarEntry:
    xattrs = {
        key: value
        for key, value in read_layer_xattrs(dir_fd, name).items()
        if not key.startswith(UNION_BOOKKEEPING_XATTRS)
    }
    return tf.TarEntry(
        name=path,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        xattrs=xattrs,
    )


def _non_directory(
    dir_fd: int, name: str, path: str, st: os.stat_result, links: Links
) -> Iterator[bytes]:
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        log.debug("native diff: %s is a socket, which a tar cannot hold; skipped", path)
        return
    if st.st_nlink > 1:
        first = links.setdefault((st.st_dev, st.st_ino), path)
        if first != path:
            yield tf.encode_header(
                tf.TarEntry(
                    name=path,
                    type=tf.LNKTYPE,
                    mode=stat.S_IMODE(mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns,
                    linkname=first,
                )
            )
            return

    if stat.S_ISREG(mode):
        yield from _regular(dir_fd, name, path, st)
        return
    entry = _entry(dir_fd, name, path, tf.REGTYPE, st)
    if stat.S_ISLNK(mode):
        entry.type, entry.linkname = tf.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISFIFO(mode):
        entry.type = tf.FIFOTYPE
    else:
        entry.type = tf.CHRTYPE if stat.S_ISCHR(mode) else tf.BLKTYPE
        entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    yield tf.encode_header(entry)


def _regular(dir_fd: int, name: str, path: str, st: os.stat_result) -> Iterator[bytes]:
    """Header, exactly ``st.st_size`` bytes of data, and padding."""
    entry = _entry(dir_fd, name, path, tf.REGTYPE, st)
    entry.size = st.st_size
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (st.st_ino, st.st_dev):
            raise OSError(f"{path} was replaced while the diff was written")
        yield tf.encode_header(entry)
        left = st.st_size
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                log.warning("native diff: %s shrank while read; padded with zeros", path)
                data = bytes(min(left, CHUNK))
            left -= len(data)
            yield data
        yield tf.padding(st.st_size)
    finally:
        os.close(fd)
