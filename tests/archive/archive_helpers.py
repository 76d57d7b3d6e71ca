"""Helpers shared by the archive tests: tree manifests, tar building, tree copies."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from graphdrivers.archive.xattrs import is_layer_xattr

Manifest = dict[str, tuple[object, ...]]


def manifest(root: Path, *, dir_times: bool = True) -> Manifest:
    """Everything a layer must carry about each entry below ``root`` (the root excluded).

    Per path: type, permission bits, uid, gid, size, sha256, link target, device number,
    layer xattrs, mtime in ns, and the hardlink group (the smallest name of the inode).
    """
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            entries[os.path.relpath(full, root)] = os.lstat(full)

    # Hardlink groups as seen inside this tree (names elsewhere, as in a snapshot, don't count).
    seen: dict[tuple[int, int], list[str]] = {}
    for rel in sorted(entries):
        st = entries[rel]
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            seen.setdefault((st.st_dev, st.st_ino), []).append(rel)
    groups = {key: names[0] for key, names in seen.items() if len(names) > 1}

    result: Manifest = {}
    for rel, st in sorted(entries.items()):
        full = os.path.join(root, rel)
        mode = st.st_mode
        digest = _sha256(full) if stat.S_ISREG(mode) else None
        target = os.readlink(full) if stat.S_ISLNK(mode) else None
        rdev = st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None
        xattrs = tuple(
            (k, os.getxattr(full, k, follow_symlinks=False))
            for k in sorted(os.listxattr(full, follow_symlinks=False))
            if is_layer_xattr(k)
        )
        mtime = st.st_mtime_ns if dir_times or not stat.S_ISDIR(mode) else None
        size = st.st_size if not stat.S_ISDIR(mode) else None
        group = groups.get((st.st_dev, st.st_ino))
        result[rel] = (
            stat.S_IFMT(mode),
            stat.S_IMODE(mode),
            st.st_uid,
            st.st_gid,
            size,
            digest,
            target,
            rdev,
            xattrs,
            mtime,
            group,
        )
    return result


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_tree(src: Path, dst: Path) -> None:
    """A full copy keeping owners, modes, times, xattrs, hardlinks and holes (GNU cp -a)."""
    subprocess.run(
        ["cp", "-a", "--preserve=all", "--sparse=always", str(src), str(dst)], check=True
    )


def make_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], *, fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    """A tar of ``members`` in exactly this order (tarfile writes what it is given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def reg(
    name: str, data: bytes = b"", mode: int = 0o644, **fields: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def node(
    name: str, kind: bytes, mode: int = 0o755, linkname: str = "", **fields: object
) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, None


def directory(name: str, mode: int = 0o755, **fields: object) -> tuple[tarfile.TarInfo, None]:
    return node(name, tarfile.DIRTYPE, mode, **fields)


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return node(name, tarfile.SYMTYPE, 0o777, target)


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return node(name, tarfile.LNKTYPE, 0o644, target)


def names(root: Path) -> list[str]:
    """Every path below ``root``, relative, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)
