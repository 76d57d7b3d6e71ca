"""Manifests: a tree written down entry by entry, so two trees can be compared and diffed.

A manifest maps every path below a root (``/`` for the root itself) to what a layer must keep of
it: type, permission bits (with setuid, setgid, sticky), owner, size and SHA-256 of regular
files, symlink target, hardlink group, xattrs, device numbers, and optionally the mtime in
nanoseconds and the link count. The conformance checks build the tree they expect, read the tree
a driver gave back, and on a mismatch print :func:`diff_manifests` of the two, which names every
path that differs and how::

    ~ /a file: mode 04222 -> 0222
    - /var/lib: missing (expected dir 0755 0:0)
    + /etc/extra: unexpected (file 0644 0:0 5 bytes)

Hardlink groups are named by the first path of the group in sorted order, so the same links in
two trees get the same label whatever the inode numbers are. Only links that stay inside the
tree form a group: a file whose other names are outside (in a lower layer's storage, say) is a
plain file here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

# Names a filesystem puts in a fresh root itself (ext4 on a thin device); never layer content.
FS_OWN_NAMES = frozenset({"lost+found"})

# Labels set by the host's security modules, not by the layer: never compared.
IGNORED_XATTRS = frozenset({"security.selinux"})

_TYPES = (
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
)


def file_type(mode: int) -> str:
    """The manifest's name for the file type in ``mode``."""
    for test, name in _TYPES:
        if test(mode):
            return name
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a manifest records of one path."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    link: str | None = None
    hardlink_group: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    rdev: tuple[int, int] | None = None
    mtime_ns: int | None = None
    nlink: int | None = None

    def describe(self) -> str:
        """One line: type, mode, owner and the type's own facts."""
        parts = [self.type, f"{self.mode:04o}", f"{self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"{self.size} bytes")
        if self.sha256 is not None:
            parts.append(f"sha256 {self.sha256[:12]}")
        if self.link is not None:
            parts.append(f"-> {self.link}")
        if self.hardlink_group is not None:
            parts.append(f"linked with {self.hardlink_group}")
        if self.rdev is not None:
            parts.append(f"dev {self.rdev[0]},{self.rdev[1]}")
        if self.xattrs:
            parts.append("xattrs " + ",".join(name for name, _ in self.xattrs))
        if self.mtime_ns is not None:
            parts.append(f"mtime {self.mtime_ns}")
        if self.nlink is not None:
            parts.append(f"nlink {self.nlink}")
        return " ".join(parts)


Manifest = dict[str, Entry]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_xattrs(
    path: Path, ignore: Collection[str] = IGNORED_XATTRS
) -> tuple[tuple[str, bytes], ...]:
    """Every xattr of ``path`` (not following a symlink), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattrs has none to compare
        return ()
    out = []
    for name in sorted(names):
        if name in ignore:
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _walk(root: Path, skip_top: Collection[str]) -> Iterator[tuple[str, Path]]:
    """(manifest path, real path) of root and everything below it, not following symlinks."""
    yield "/", root
    stack = [("", root)]
    while stack:
        rel, directory = stack.pop()
        for name in sorted(os.listdir(directory)):
            if not rel and name in skip_top:
                continue
            path = directory / name
            yield f"{rel}/{name}", path
            if stat.S_ISDIR(os.lstat(path).st_mode):
                stack.append((f"{rel}/{name}", path))


def manifest(
    root: Path | str,
    *,
    mtimes: bool = False,
    dir_mtimes: bool = False,
    nlink: bool = False,
    skip_top: Collection[str] = FS_OWN_NAMES,
) -> Manifest:
    """The manifest of the tree at ``root``.

    ``mtimes`` records the mtime of every entry but directories (whose mtimes change whenever
    an entry is added below them); ``dir_mtimes`` records directories' too. ``nlink`` records
    link counts, which only make sense for trees nothing else links into (a victim directory).
    """
    root = Path(root)
    raw: dict[str, tuple[os.stat_result, Path]] = {}
    for rel, path in _walk(root, skip_top):
        raw[rel] = (os.lstat(path), path)

    groups: dict[tuple[int, int], list[str]] = {}
    for rel, (st, _) in raw.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)

    out: Manifest = {}
    for rel, (st, path) in raw.items():
        kind = file_type(st.st_mode)
        members = groups.get((st.st_dev, st.st_ino), [])
        out[rel] = Entry(
            path=rel,
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else None,
            sha256=_sha256(path) if kind == "file" else None,
            link=os.readlink(path) if kind == "symlink" else None,
            hardlink_group=min(members) if len(members) > 1 else None,
            xattrs=read_xattrs(path),
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
            if kind in ("char", "block")
            else None,
            mtime_ns=st.st_mtime_ns if (mtimes and kind != "dir") or dir_mtimes else None,
            nlink=st.st_nlink if nlink else None,
        )
    return out


def without(m: Mapping[str, Entry], *paths: str) -> Manifest:
    """A copy of ``m`` without ``paths`` and everything below them."""
    out = {}
    for rel, entry in m.items():
        if any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in paths):
            continue
        out[rel] = entry
    return out


def strip_mtimes(m: Mapping[str, Entry], *, to_seconds: bool = False) -> Manifest:
    """A copy of ``m`` without mtimes, or with them cut to whole seconds."""
    out = {}
    for rel, e in m.items():
        if e.mtime_ns is None:
            out[rel] = e
            continue
        value = e.mtime_ns // 1_000_000_000 * 1_000_000_000 if to_seconds else None
        out[rel] = dataclasses.replace(e, mtime_ns=value)
    return out


def _field_diffs(a: Entry, b: Entry) -> list[str]:
    out = []
    for field in dataclasses.fields(Entry):
        if field.name == "path":
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x == y:
            continue
        if field.name == "mode":
            out.append(f"mode {x:04o} -> {y:04o}")
        elif field.name == "xattrs":
            out.append(f"xattrs {dict(x)!r} -> {dict(y)!r}")
        else:
            out.append(f"{field.name} {x!r} -> {y!r}")
    return out


def diff_manifests(expected: Mapping[str, Entry], got: Mapping[str, Entry]) -> list[str]:
    """Readable lines naming every path that differs (empty when the trees are equal)."""
    lines = []
    for rel in sorted(set(expected) | set(got)):
        if rel not in got:
            lines.append(f"- {rel}: missing (expected {expected[rel].describe()})")
        elif rel not in expected:
            lines.append(f"+ {rel}: unexpected ({got[rel].describe()})")
        elif expected[rel] != got[rel]:
            lines.append(f"~ {rel}: " + "; ".join(_field_diffs(expected[rel], got[rel])))
    return lines


def format_manifest(m: Mapping[str, Entry]) -> str:
    """The whole tree, one path a line, for a failure message."""
    return "\n".join(f"  {rel}  {m[rel].describe()}" for rel in sorted(m))


def assert_same_tree(expected: Mapping[str, Entry], got: Mapping[str, Entry], what: str) -> None:
    """Raise AssertionError with the differences and the tree that was wrong."""
    lines = diff_manifests(expected, got)
    if not lines:
        return
    raise AssertionError(
        f"{what}: the tree differs from what was expected "
        f"(- missing, + unexpected, ~ changed: expected -> got)\n"
        + "\n".join(lines)
        + "\nthe tree that was found:\n"
        + format_manifest(got)
    )
