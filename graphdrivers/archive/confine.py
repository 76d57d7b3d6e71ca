"""Reaching paths under a layer root without ever leaving it.

Everything the archive code does to a tree goes through directory file descriptors: a path is
opened one component at a time from a descriptor of the root with ``O_NOFOLLOW|O_DIRECTORY``,
and the final name is used relative to its parent's descriptor (``dir_fd=``), never by joining
strings into a host path. So a symlink that a layer put (or swapped in) never leads outside.

Symlinks met *between* components are followed the way a ``chroot`` into the root would follow
them (:class:`DirResolver` with ``follow=True``, used by apply): an absolute target starts again
at the layer root, ``..`` stops at the root, and at most :data:`MAX_SYMLINK_HOPS` links are
followed per lookup. That keeps layers working whose producers wrote names through a symlinked
directory (``lib/...`` where ``lib -> usr/lib``) while making escape impossible. The final
component of an entry is never followed. Readers of our own trees (changes, export) use
``follow=False``: a symlink where a directory should be is an error there.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
from pathlib import Path

from graphdrivers.errors import BreakoutError, InvalidArchive

log = logging.getLogger(__name__)

MAX_SYMLINK_HOPS = 40
DIR_CACHE_SIZE = 64
IMPLIED_DIR_MODE = 0o755
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Parts = tuple[str, ...]


def clean_name(name: str) -> Parts:
    """Split a tar entry name into components, dropping ``/``, ``.`` and resolving ``..``.

    A leading ``/`` is stripped (the name is relative to the layer root). A name whose ``..``
    would climb above the root raises :class:`BreakoutError`; an embedded NUL raises
    :class:`InvalidArchive`. The empty tuple names the root itself.
    """
    if "\0" in name:
        raise InvalidArchive(f"entry name {name!r} holds a NUL byte", path=name)
    fast = tuple(name.rstrip("/").split("/"))
    if not ("" in fast or "." in fast or ".." in fast):
        return fast

    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise BreakoutError(f"entry {name!r} climbs out of the layer root", path=name)
            parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


def join_target(base: Parts, target: str) -> Parts:
    """Where symlink ``target`` found in directory ``base`` points, confined to the root."""
    parts = [] if target.startswith("/") else list(base)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


class NotADirectory(InvalidArchive):
    """A path component that must be a directory is something else (and not followable)."""


class DirResolver:
    """Open directories below ``root`` by descriptor, caching the recent ones.

    :meth:`dir` returns the descriptor of a directory and its *real* path (with the symlinks
    followed on the way resolved), or None when a component is missing and ``create`` is false.
    Descriptors stay owned by the resolver: callers must not close them, and must call
    :meth:`trim` only when they hold none (between entries), since trimming closes old ones.
    :meth:`forget` drops every cached descriptor; call it after removing or replacing a
    directory or a symlink, which could be part of a cached resolution.
    """

    def __init__(self, root: Path, *, follow: bool) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._follow = follow
        self._cache: collections.OrderedDict[Parts, tuple[int, Parts]] = collections.OrderedDict()
        self._retired: list[int] = []

    def dir(self, parts: Parts, *, create: bool = False) -> tuple[int, Parts] | None:
        """The descriptor and real path of directory ``parts`` (see the class docstring)."""
        return self._dir(parts, create, [0])

    def _dir(self, parts: Parts, create: bool, hops: list[int]) -> tuple[int, Parts] | None:
        if not parts:
            return self.root_fd, ()
        hit = self._cache.get(parts)
        if hit is not None:
            self._cache.move_to_end(parts)
            return hit

        parent = self._dir(parts[:-1], create, hops)
        if parent is None:
            return None
        parent_fd, parent_real = parent
        name = parts[-1]

        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            found = (fd, (*parent_real, name))
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, IMPLIED_DIR_MODE, dir_fd=parent_fd)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            found = (fd, (*parent_real, name))
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            followed = self._follow_link(parent_fd, parent_real, name, create, hops)
            if followed is None:
                return None
            found = (os.dup(followed[0]), followed[1])

        self._cache[parts] = found
        return found

    def _follow_link(
        self, parent_fd: int, parent_real: Parts, name: str, create: bool, hops: list[int]
    ) -> tuple[int, Parts] | None:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        where = "/".join((*parent_real, name))
        if not stat.S_ISLNK(st.st_mode) or not self._follow:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise NotADirectory(f"/{where} is {kind}; cannot look up names below it", path=where)

        hops[0] += 1
        if hops[0] > MAX_SYMLINK_HOPS:
            raise InvalidArchive(
                f"more than {MAX_SYMLINK_HOPS} symlinks followed resolving /{where}", path=where
            )
        target = join_target(parent_real, os.readlink(name, dir_fd=parent_fd))
        log.debug("following /%s -> /%s inside the layer root", where, "/".join(target))
        return self._dir(target, create, hops)

    def forget(self) -> None:
        """Drop every cached descriptor (closed at the next :meth:`trim`)."""
        self._retired.extend(fd for fd, _ in self._cache.values())
        self._cache.clear()

    def trim(self) -> None:
        """Close retired descriptors and the least recently used beyond the cache size."""
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()
        while len(self._cache) > DIR_CACHE_SIZE:
            _, (fd, _) = self._cache.popitem(last=False)
            os.close(fd)

    def close(self) -> None:
        self.forget()
        self.trim()
        os.close(self.root_fd)

    def __enter__(self) -> DirResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_at(dir_fd: int, name: str) -> bool:
    """Remove entry ``name`` of directory ``dir_fd`` and, for a directory, all below it.

    Works through descriptors only (never a path string), never follows a symlink, and returns
    whether the removed entry was a directory or a symlink (something a resolver may have
    cached). A missing entry is not an error.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return stat.S_ISLNK(st.st_mode)

    remove_children(dir_fd, name)
    os.rmdir(name, dir_fd=dir_fd)
    return True


def remove_children(dir_fd: int, name: str) -> None:
    """Remove everything inside directory ``name`` of ``dir_fd`` (see :func:`remove_at`)."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_at(fd, child)
    finally:
        os.close(fd)
