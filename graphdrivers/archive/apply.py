"""Unpacking a layer tar into a tree, confined to it: :func:`apply_layer`.

Each entry is handled as follows (``root`` is the tree being written):

1. Its name is cleaned (:func:`~graphdrivers.archive.confine.clean_name`): a leading ``/`` is
   dropped, ``..`` that would climb out of the root is a :class:`BreakoutError`. Entries naming
   the root itself (``./``, ``/``) are skipped, so a layer never changes the root's owner or
   mode; an entry with an empty name is an :class:`InvalidArchive`. A component ``.wh.``,
   ``.wh..`` or ``.wh...``, and a directory component starting with ``.wh.``, are invalid.
2. Whiteouts, by :attr:`ApplyOptions.whiteouts`:

   ``"delete"`` (a full tree: vfs, btrfs, devicemapper)
      ``.wh.<name>`` removes ``<name>`` and everything below it; ``.wh..wh..opq`` removes every
      entry of its directory. What this same layer unpacked is kept whatever the order of the
      entries: a whiteout hides only lower layers. A whiteout of a missing name does nothing.
   ``"overlay"`` (a union upper directory)
      ``.wh.<name>`` becomes a character device 0/0 ``<name>``; ``.wh..wh..opq`` sets
      ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with ``userxattr``) on its directory.
      A directory unpacked over a whiteout this layer made is made opaque.
   ``"aufs"`` (an aufs-style upper directory)
      ``.wh.`` files and ``.wh..wh..opq`` markers are written as the empty files they are;
      ``.wh.<name>`` first removes a ``<name>`` that only this layer's markers made.

   In every mode a marker below a name this layer whites out (``foo/.wh.bar`` beside
   ``.wh.foo``) hides nothing more and is skipped.

   Other ``.wh..wh.*`` names are aufs bookkeeping and are skipped in every mode.
3. The parent directory is opened through descriptors from the root. Missing parents are
   created 0755 root:root. A symlink met on the way is followed as inside a chroot (never out
   of the root); a non-directory on the way is an :class:`InvalidArchive`.
4. If the name exists it is replaced: a directory over a directory keeps the tree and takes the
   new attributes; anything else is removed first (a directory with all below it). So a
   duplicate entry means the last one wins, as in moby.
5. The entry is created without following any symlink (``O_CREAT|O_EXCL|O_NOFOLLOW``,
   ``mkdir``/``symlink``/``mknod``/``link`` with ``dir_fd``). Regular files are written
   sparsely: whole 4 KiB blocks of zeros are skipped, so a sparse file stays sparse. Hardlink
   targets must already exist inside the root and must not be directories. Character and
   block devices need :attr:`ApplyOptions.allow_devices`; FIFOs are always allowed.
6. Then owner (numeric uid/gid), then mode (so setuid/setgid bits survive the chown), then
   xattrs (after chown, which clears ``security.capability``), then times with nanoseconds.
   None of these ever goes through a symlink: regular files and directories are changed through
   their open descriptor, the others with ``follow_symlinks=False``. Symlinks get no mode.
   Directory times are set last, after every entry, since adding entries changes them.

The stream may be plain, gzip or zstd (:func:`~graphdrivers.archive.compression.open_layer_stream`)
and is read with the caps of :class:`ApplyOptions`. Whatever goes wrong (a malformed or hostile
entry, a cap, a truncated stream) raises before anything outside ``root`` could be touched; the
tree may then hold part of the layer, which is why drivers apply into a fresh layer they remove
on failure.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Literal

from graphdrivers.archive import tarformat as tf
from graphdrivers.archive.compression import open_layer_stream
from graphdrivers.archive.confine import (
    DIR_FLAGS,
    DirResolver,
    NotADirectory,
    Parts,
    clean_name,
    remove_at,
)
from graphdrivers.archive.xattrs import fd_path, is_layer_xattr
from graphdrivers.errors import InvalidArchive, NotSupported, QuotaExceeded
from graphdrivers.whiteout import (
    INVALID_WHITEOUT_NAMES,
    OPAQUE_VALUE,
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_OPAQUE_XATTR_USER,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    whited_out_name,
)

log = logging.getLogger(__name__)

WhiteoutMode = Literal["delete", "overlay", "aufs"]
WHITEOUT_MODES = ("delete", "overlay", "aufs")

GiB = 1 << 30
ZERO_RUN = bytes(4096)
ZERO_HINT = bytes(64)  # cheap first test: a chunk without 64 zero bytes has no zero block
SPARSE_BLOCK = len(ZERO_RUN)
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
OVERLAY_WHITEOUT_DEVICE = os.makedev(0, 0)
_NO_XATTR_SUPPORT = (errno.ENOTSUP, errno.EOPNOTSUPP)


def _running_as_root() -> bool:
    return os.geteuid() == 0


@dataclasses.dataclass(frozen=True)
class ApplyOptions:
    """How :func:`apply_layer` unpacks, and the caps it enforces.

    ``allow_devices`` defaults to whether the process is root: only root can make device nodes,
    and a root-run driver is what unpacks image layers into layer directories no other user
    can enter (0700). Pass False to refuse them (an :class:`InvalidArchive`).
    The caps default to generous sizes for real images; a layer over one is refused.
    """

    whiteouts: WhiteoutMode = "delete"
    userxattr: bool = False
    allow_devices: bool = dataclasses.field(default_factory=_running_as_root)
    max_bytes: int = 256 * GiB
    max_entries: int = 4_000_000
    max_name_bytes: int = 4096
    max_pax_bytes: int = 1 << 20
    ignore_chown_errors: bool = False
    best_effort_xattrs: bool = False

    def __post_init__(self) -> None:
        if self.whiteouts not in WHITEOUT_MODES:
            raise ValueError(
                f"ApplyOptions.whiteouts must be one of {', '.join(WHITEOUT_MODES)}, "
                f"not {self.whiteouts!r}"
            )

    def limits(self) -> tf.ReadLimits:
        return tf.ReadLimits(
            max_bytes=self.max_bytes,
            max_entries=self.max_entries,
            max_name_bytes=self.max_name_bytes,
            max_pax_bytes=self.max_pax_bytes,
        )


def apply_layer(root: Path, stream: BinaryIO, options: ApplyOptions | None = None) -> int:
    """Unpack the layer tar ``stream`` into ``root``; return the bytes of regular files written.

    Hardlinks add nothing to the count, so after applying a diff made by
    :func:`~graphdrivers.archive.export_changes` onto a copy of its parent, the result equals
    :func:`~graphdrivers.archive.changes_size` of the same changes.
    """
    opts = options or ApplyOptions()
    reader = tf.TarReader(open_layer_stream(stream), opts.limits())
    with _Applier(Path(root), opts) as applier:
        for entry in reader:
            applier.apply(entry, reader)
        applier.finish()
    log.debug("applied %d entries into %s (%d bytes)", reader.entries, root, applier.size)
    return applier.size


class _Applier:
    """The state of one apply: the resolver, what this layer unpacked, deferred dir times."""

    def __init__(self, root: Path, opts: ApplyOptions) -> None:
        self.opts = opts
        self.resolver = DirResolver(root, follow=True)
        self.unpacked: set[str] = set()
        self.whiteouts_made: set[str] = set()
        self.hidden: set[Parts] = set()  # names this layer's .wh. entries hide (as named)
        self.dir_times: dict[Parts, tuple[int, int]] = {}
        self.size = 0
        self.is_root = _running_as_root()
        self.opaque_xattr = OVERLAY_OPAQUE_XATTR_USER if opts.userxattr else OVERLAY_OPAQUE_XATTR

    def __enter__(self) -> _Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resolver.close()

    # ------------------------------------------------------------------ dispatch

    def apply(self, entry: tf.TarEntry, reader: tf.TarReader) -> None:
        try:
            self._apply(entry, reader)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QuotaExceeded(
                    f"no space left applying entry {entry.name!r}: {exc.strerror}",
                    path=entry.name,
                ) from exc
            raise InvalidArchive(
                f"cannot apply entry {entry.name!r}: {exc.strerror or exc}", path=entry.name
            ) from exc
        finally:
            self.resolver.trim()

    def _apply(self, entry: tf.TarEntry, reader: tf.TarReader) -> None:
        parts = clean_name(entry.name)
        if not parts:
            if entry.name.strip("/") not in ("", ".") or not entry.name:
                raise InvalidArchive(
                    f"entry {entry.name!r} names the layer root itself", path=entry.name
                )
            if entry.type != tf.DIRTYPE:
                raise InvalidArchive(f"entry {entry.name!r} makes the root a non-directory")
            log.debug("skipping root entry %r: the root's attributes are not changed", entry.name)
            return
        _check_components(parts, entry.name)

        base = parts[-1]
        mode = self.opts.whiteouts
        if base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE:
            log.debug("skipping aufs metadata entry %r", entry.name)
            return
        if not base.startswith(WHITEOUT_PREFIX):
            self._unpack(parts, entry, reader)
            return
        if self._below_own_whiteout(parts[:-1]):
            log.debug("skipping %r: this layer whites out a directory above it", entry.name)
            return
        if base != WHITEOUT_OPAQUE:
            self.hidden.add((*parts[:-1], whited_out_name(base)))
        if mode == "aufs":
            self._aufs_marker(parts, entry, reader)
        elif base == WHITEOUT_OPAQUE:
            self._opaque(parts[:-1])
        else:
            self._whiteout(parts[:-1], whited_out_name(base))

    def _below_own_whiteout(self, dir_parts: Parts) -> bool:
        """True if this layer whited out ``dir_parts`` or a directory above it.

        A layer may hold both ``.wh.foo`` and ``foo/.wh.bar`` (c/storage applies it: foo is
        gone); the second marker hides nothing more, and in a union's upper dir ``foo`` is then
        a whiteout, not a directory that could hold it.
        """
        return any(dir_parts[:i] in self.hidden for i in range(1, len(dir_parts) + 1))

    # ------------------------------------------------------------------ whiteouts

    def _whiteout(self, dir_parts: Parts, name: str) -> None:
        create = self.opts.whiteouts == "overlay"
        try:
            found = self.resolver.dir(dir_parts, create=create)
        except NotADirectory:
            # A file or symlink at a parent hides everything below it in every format already.
            found = None
        if found is None:
            log.debug(
                "whiteout of %s/%s: no such directory; nothing to hide", "/".join(dir_parts), name
            )
            return
        dir_fd, real = found
        path = "/".join((*real, name))

        if self.opts.whiteouts == "delete":
            self._remove_lower(dir_fd, name, path)
            return
        if path in self.unpacked:
            return  # this layer's own entry of that name wins
        if remove_at(dir_fd, name):
            self.resolver.forget()
        os.mknod(name, stat.S_IFCHR, OVERLAY_WHITEOUT_DEVICE, dir_fd=dir_fd)
        self.whiteouts_made.add(path)

    def _aufs_marker(self, parts: Parts, entry: tf.TarEntry, reader: tf.TarReader) -> None:
        """Write an aufs marker file as it is; a whiteout first removes its name if only
        markers of this layer made it (``foo/.wh.bar`` before ``.wh.foo``)."""
        try:
            parent = self.resolver.dir(parts[:-1], create=True)
        except NotADirectory:
            log.debug("marker %s below a non-directory hides nothing; left out", "/".join(parts))
            return
        if parts[-1] != WHITEOUT_OPAQUE:
            found = parent
            assert found is not None
            dir_fd, real = found
            name = whited_out_name(parts[-1])
            if "/".join((*real, name)) not in self.unpacked and remove_at(dir_fd, name):
                self.resolver.forget()
        self._unpack(parts, entry, reader, own=False)

    def _opaque(self, dir_parts: Parts) -> None:
        if self.opts.whiteouts == "overlay":
            found = self.resolver.dir(dir_parts, create=True)
            assert found is not None
            dir_fd, real = found
            self._set_opaque(dir_fd, "/".join(real))
            self._mark_unpacked("/".join(real))
            return

        try:
            found = self.resolver.dir(dir_parts)
        except NotADirectory:
            found = None
        if found is None:
            return
        dir_fd, real = found
        for child in os.listdir(dir_fd):
            self._remove_lower(dir_fd, child, "/".join((*real, child)))

    def _set_opaque(self, dir_fd: int, path: str) -> None:
        try:
            os.setxattr(dir_fd, self.opaque_xattr, OPAQUE_VALUE)
        except OSError as exc:
            raise NotSupported(
                f"xattr {self.opaque_xattr} on the filesystem of the layer (/{path})",
                hint="overlay whiteouts need trusted.* xattrs (root) or userxattr",
            ) from exc

    def _remove_lower(self, dir_fd: int, name: str, path: str) -> None:
        """Remove ``name`` and all below it, except what this layer unpacked."""
        if path not in self.unpacked:
            if remove_at(dir_fd, name):
                self.resolver.forget()
            return
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            return
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, f"{path}/{child}")
        finally:
            os.close(fd)

    def _mark_unpacked(self, path: str) -> None:
        """Remember ``path`` and its ancestors as this layer's own (see _remove_lower)."""
        while path and path not in self.unpacked:
            self.unpacked.add(path)
            path = path.rpartition("/")[0]

    # ------------------------------------------------------------------ entries

    def _unpack(
        self, parts: Parts, entry: tf.TarEntry, reader: tf.TarReader, *, own: bool = True
    ) -> None:
        """Make the entry; ``own`` (not an aufs marker) makes it and its parents this layer's."""
        if own and self.hidden:
            for i in range(1, len(parts) + 1):
                self.hidden.discard(parts[:i])
        found = self.resolver.dir(parts[:-1], create=True)
        assert found is not None
        dir_fd, real = found
        name = parts[-1]
        path = "/".join((*real, name))
        link_source = self._link_source(entry) if entry.type == tf.LNKTYPE else None

        # Create optimistically: in a fresh layer the name is almost never there already.
        try:
            self._create(dir_fd, name, path, real, entry, reader, link_source, merge=False)
        except FileExistsError:
            merge = self._clear_for(dir_fd, name, path, entry)
            self._create(dir_fd, name, path, real, entry, reader, link_source, merge=merge)
        if own:
            self._mark_unpacked(path)

    def _create(
        self,
        dir_fd: int,
        name: str,
        path: str,
        real: Parts,
        entry: tf.TarEntry,
        reader: tf.TarReader,
        link_source: tuple[int, str] | None,
        *,
        merge: bool,
    ) -> None:
        """Make the entry; raises FileExistsError (before any change) if the name is taken."""
        kind = entry.type
        if kind == tf.REGTYPE:
            self._regular(dir_fd, name, entry, reader)
        elif kind == tf.DIRTYPE:
            self._directory(dir_fd, name, path, real, entry, merge)
        elif kind == tf.SYMTYPE:
            if "\0" in entry.linkname:
                raise InvalidArchive(f"symlink {entry.name!r} has a NUL in its target")
            os.symlink(entry.linkname, name, dir_fd=dir_fd)
            self._attributes_at(dir_fd, name, entry, symlink=True)
        elif kind == tf.LNKTYPE:
            assert link_source is not None
            src_fd, src_name = link_source
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        elif kind == tf.FIFOTYPE:
            os.mkfifo(name, 0o600, dir_fd=dir_fd)
            self._attributes_at(dir_fd, name, entry, symlink=False)
        else:
            self._device(dir_fd, name, entry)

    def _clear_for(self, dir_fd: int, name: str, path: str, entry: tf.TarEntry) -> bool:
        """Make room for the entry; True if an existing directory is kept (merged)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if entry.type == tf.DIRTYPE and stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and path in self.unpacked:
            self.size -= st.st_size  # a duplicate entry: the last one counts
        if remove_at(dir_fd, name):
            self.resolver.forget()
        return False

    def _link_source(self, entry: tf.TarEntry) -> tuple[int, str]:
        """The directory descriptor and name of a hardlink's target (inside the root)."""
        target = clean_name(entry.linkname)
        if not target:
            raise InvalidArchive(f"hardlink {entry.name!r} points at the layer root")
        try:
            found = self.resolver.dir(target[:-1])
        except NotADirectory:
            found = None
        missing = InvalidArchive(
            f"hardlink {entry.name!r} points at {entry.linkname!r}, which is not in the layer",
            path=entry.name,
        )
        if found is None:
            raise missing
        try:
            st = os.stat(target[-1], dir_fd=found[0], follow_symlinks=False)
        except FileNotFoundError as exc:
            raise missing from exc
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArchive(f"hardlink {entry.name!r} points at directory {entry.linkname!r}")
        return found[0], target[-1]

    def _regular(self, dir_fd: int, name: str, entry: tf.TarEntry, reader: tf.TarReader) -> None:
        fd = os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            write_sparse(fd, reader.spans(), entry.size)
            self._chown(fd, entry)
            os.fchmod(fd, entry.mode)
            self._set_xattrs(fd, entry, regular_or_dir=True)
            os.utime(fd, ns=_times(entry))
        finally:
            os.close(fd)
        self.size += entry.size

    def _directory(
        self, dir_fd: int, name: str, path: str, real: Parts, entry: tf.TarEntry, merge: bool
    ) -> None:
        if not merge:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            self._chown(fd, entry)
            os.fchmod(fd, entry.mode)
            self._set_xattrs(fd, entry, regular_or_dir=True)
            if path in self.whiteouts_made:
                self._set_opaque(fd, path)
                self.whiteouts_made.discard(path)
        finally:
            os.close(fd)
        self.dir_times[(*real, name)] = _times(entry)

    def _device(self, dir_fd: int, name: str, entry: tf.TarEntry) -> None:
        if not self.opts.allow_devices:
            raise InvalidArchive(
                f"entry {entry.name!r} is a device node; pass ApplyOptions(allow_devices=True) "
                "to create device nodes",
                path=entry.name,
            )
        kind = stat.S_IFCHR if entry.type == tf.CHRTYPE else stat.S_IFBLK
        device = os.makedev(entry.devmajor, entry.devminor)
        os.mknod(name, kind | 0o600, device, dir_fd=dir_fd)
        self._attributes_at(dir_fd, name, entry, symlink=False)

    # ------------------------------------------------------------------ attributes

    def _attributes_at(self, dir_fd: int, name: str, entry: tf.TarEntry, *, symlink: bool) -> None:
        """Owner, mode, xattrs and times of a non-regular, non-directory entry by name."""
        self._chown(None, entry, dir_fd=dir_fd, name=name)
        if not symlink:
            os.chmod(name, entry.mode, dir_fd=dir_fd, follow_symlinks=False)
        self._set_xattrs(fd_path(dir_fd, name), entry, regular_or_dir=False)
        os.utime(name, ns=_times(entry), dir_fd=dir_fd, follow_symlinks=False)

    def _chown(
        self, fd: int | None, entry: tf.TarEntry, *, dir_fd: int | None = None, name: str = ""
    ) -> None:
        try:
            if fd is not None:
                os.fchown(fd, entry.uid, entry.gid)
            else:
                os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if not self.opts.ignore_chown_errors:
                raise
            log.debug("ignoring chown of %r to %d:%d: %s", entry.name, entry.uid, entry.gid, exc)

    def _set_xattrs(self, target: int | str, entry: tf.TarEntry, *, regular_or_dir: bool) -> None:
        if not entry.xattrs:
            return
        for key, value in entry.xattrs.items():
            if not is_layer_xattr(key):
                log.debug("not applying xattr %s of %r (not a layer xattr)", key, entry.name)
                continue
            if key.startswith("trusted.") and not self.is_root:
                log.debug("not applying %s of %r: trusted.* needs root", key, entry.name)
                continue
            if key.startswith("user.") and not regular_or_dir:
                log.debug(
                    "not applying %s of %r: user.* only exists on files and directories",
                    key,
                    entry.name,
                )
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_XATTR_SUPPORT:
                    raise
                if self.opts.best_effort_xattrs:
                    log.debug("xattr %s of %r not supported here; skipped", key, entry.name)
                    continue
                raise NotSupported(
                    f"xattr {key} (of layer entry {entry.name!r}) on the layer's filesystem",
                    hint="use a filesystem with xattrs, or ApplyOptions(best_effort_xattrs=True)",
                ) from exc

    def finish(self) -> None:
        """Set directory times, now that no entry will be added to them any more."""
        for real, times in self.dir_times.items():
            try:
                found = self.resolver.dir(real[:-1])
                if found is None:
                    continue
                st = os.stat(real[-1], dir_fd=found[0], follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.utime(real[-1], ns=times, dir_fd=found[0], follow_symlinks=False)
            except (FileNotFoundError, NotADirectory):
                continue
            finally:
                self.resolver.trim()


def _check_components(parts: Parts, name: str) -> None:
    if ".wh." not in name:
        return
    for i, part in enumerate(parts):
        if part in INVALID_WHITEOUT_NAMES:
            raise InvalidArchive(f"entry {name!r}: {part!r} is not a valid name", path=name)
        if i < len(parts) - 1 and part.startswith(WHITEOUT_PREFIX):
            raise InvalidArchive(
                f"entry {name!r}: a whiteout name ({part!r}) cannot be a directory", path=name
            )


def _times(entry: tf.TarEntry) -> tuple[int, int]:
    atime = entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns
    return atime, entry.mtime_ns


def write_sparse(fd: int, spans: Iterable[tuple[bytes, int, int]], size: int) -> None:
    """Write the data ``spans`` (``(buffer, start, end)``) to the new file ``fd`` sparsely.

    Only whole 4 KiB blocks of zeros aligned to the file offset become holes; a span with no
    run of 4 KiB zeros anywhere (the usual case) is written in one call.
    """
    offset = 0
    skipped = False
    for buf, first, last in spans:
        n = last - first
        if (
            n < SPARSE_BLOCK
            or buf.find(ZERO_HINT, first, last) < 0
            or buf.find(ZERO_RUN, first, last) < 0
        ):
            _pwrite_all(fd, memoryview(buf)[first:last], offset)
            offset += n
            continue

        start: int | None = None
        pos = first
        while pos < last:
            end = min(last, pos + SPARSE_BLOCK - (offset + pos - first) % SPARSE_BLOCK)
            if end - pos == SPARSE_BLOCK and buf[pos:end] == ZERO_RUN:
                if start is not None:
                    _pwrite_all(fd, memoryview(buf)[start:pos], offset + start - first)
                    start = None
                skipped = True
            elif start is None:
                start = pos
            pos = end
        if start is not None:
            _pwrite_all(fd, memoryview(buf)[start:last], offset + start - first)
        offset += n
    if skipped:
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
