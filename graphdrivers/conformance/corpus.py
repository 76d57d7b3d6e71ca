"""Trees with every file type and attribute a layer must keep, in named parts.

Each part writes one kind of thing into a layer root (special mode bits, user xattrs, hardlinks,
a sparse file...), so a check that fails names the thing that was lost. The snapshot checks and
the diff/apply checks run the same parts. A part the host cannot make (no user xattrs on the
backing filesystem, no privilege for device nodes) skips the check with the missing thing as
its reason.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.helpers import make_socket, mkdir, write

# A fixed time with a nanosecond part, and the same for directories.
MTIME_NS = 1_500_000_000_123_456_789
DIR_MTIME_NS = 1_400_000_000_987_654_321

# security.capability v2 for cap_net_bind_service (bit 10), permitted and effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
CAP_XATTR = "security.capability"
TRUSTED_XATTR = "trusted.graphdrivers-conformance"

SPARSE_SIZE = 32 << 20
SPARSE_CHUNKS = (0, 16 << 20, SPARSE_SIZE - 4096)

Part = Callable[[Path, Any], None]


def _setxattr(path: Path, name: str, value: bytes, what: str) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"{what} on the backing filesystem")
        if exc.errno == errno.EPERM:
            pytest.skip(f"privilege to set {what}")
        raise


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"privilege root (to make {what})")


def regular(root: Path, caps: Any) -> None:
    write(root, "etc/hosts", b"127.0.0.1 localhost\n")
    write(root, "empty", b"", mode=0o600)
    write(root, "data/binary", bytes(range(256)) * 300, mode=0o640)
    write(root, ".hidden", b"dot file")
    write(root, ".wh", b"near a whiteout name")
    write(root, ".whx", b"near a whiteout name too")


def owners(root: Path, caps: Any) -> None:
    _require_root("files owned by other users")
    mkdir(root, "home/user", mode=0o750, uid=1000, gid=1000)
    write(root, "home/user/file", b"mine", mode=0o600, uid=1000, gid=100)
    write(root, "srv/nobody", b"x", uid=65534, gid=65534)


def special_bits(root: Path, caps: Any) -> None:
    _require_root("setuid files owned by other users")
    write(root, "bin/suid", b"#!/bin/true\n", mode=0o4755)
    write(root, "bin/sgid", b"#!/bin/true\n", mode=0o2755, gid=50)
    write(root, "bin/both", b"#!/bin/true\n", mode=0o6711, uid=1, gid=2)
    write(root, "bin/odd", b"x", mode=0o4222)
    mkdir(root, "tmp", mode=0o1777)
    mkdir(root, "shared", mode=0o2775, gid=100)


def hardlinks(root: Path, caps: Any) -> None:
    write(root, "links/a", b"one inode, three names", mode=0o640)
    os.link(root / "links/a", root / "links/b")
    mkdir(root, "other")
    os.link(root / "links/a", root / "other/c")
    write(root, "links/empty", b"")
    os.link(root / "links/empty", root / "links/empty2")


def symlinks(root: Path, caps: Any) -> None:
    write(root, "etc/target", b"pointed at")
    os.symlink("etc/target", root / "relative")
    os.symlink("/etc/target", root / "absolute")
    os.symlink("no/such/thing", root / "dangling")
    mkdir(root, "deep/dir")
    os.symlink("../../etc", root / "deep/dir/up")
    os.symlink("deep", root / "dirlink")


def fifo(root: Path, caps: Any) -> None:
    mkdir(root, "run")
    os.mkfifo(root / "run/fifo", 0o620)
    os.chmod(root / "run/fifo", 0o620)


def unix_socket(root: Path, caps: Any) -> None:
    mkdir(root, "sock")
    make_socket(root / "sock/listener")
    os.chmod(root / "sock/listener", 0o755)


def devices(root: Path, caps: Any) -> None:
    if not caps.supports_devices:
        pytest.skip("device nodes (the driver does not support them)")
    _require_root("device nodes")
    mkdir(root, "dev")
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
    os.chmod(root / "dev/null", 0o666)
    os.chmod(root / "dev/loop9", 0o660)


def user_xattrs(root: Path, caps: Any) -> None:
    f = write(root, "xattr/file", b"with xattrs")
    _setxattr(f, "user.comment", b"hello", "user xattrs")
    _setxattr(f, "user.binary", b"\x00\xff\x10", "user xattrs")
    d = mkdir(root, "xattr/dir")
    _setxattr(d, "user.dir", b"on a directory", "user xattrs")


def capability_xattr(root: Path, caps: Any) -> None:
    _require_root("files with security.capability")
    f = write(root, "bin/ping", b"\x7fELF", mode=0o755)
    _setxattr(f, CAP_XATTR, CAPABILITY, "security.capability")


def trusted_xattrs(root: Path, caps: Any) -> None:
    _require_root("trusted.* xattrs")
    f = write(root, "trusted/file", b"t")
    _setxattr(f, TRUSTED_XATTR, b"value", "trusted.* xattrs")


def mtimes(root: Path, caps: Any) -> None:
    f = write(root, "times/file", b"old")
    os.symlink("file", root / "times/link")
    os.utime(f, ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "times/link", ns=(MTIME_NS, MTIME_NS + 1), follow_symlinks=False)


def set_dir_mtimes(root: Path) -> None:
    """Give every directory below root the fixed directory mtime (deepest first)."""
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        os.utime(d, ns=(DIR_MTIME_NS, DIR_MTIME_NS))


def sparse(root: Path, caps: Any) -> None:
    path = root / "sparse/file"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, SPARSE_SIZE)
        for offset in SPARSE_CHUNKS:
            os.pwrite(fd, b"D" * 4096, offset)
    finally:
        os.close(fd)
    if not is_sparse(path):
        pytest.skip("sparse files (holes) on the backing filesystem")


def is_sparse(path: Path) -> bool:
    """True if ``path`` has fewer blocks allocated than a quarter of its size."""
    st = os.lstat(path)
    return st.st_blocks * 512 < st.st_size // 4


# name -> part; the diff/apply checks leave out what the tar format cannot carry.
PARTS: dict[str, Part] = {
    "regular": regular,
    "owners": owners,
    "special_bits": special_bits,
    "hardlinks": hardlinks,
    "symlinks": symlinks,
    "fifo": fifo,
    "socket": unix_socket,
    "devices": devices,
    "user_xattrs": user_xattrs,
    "capability_xattr": capability_xattr,
    "trusted_xattrs": trusted_xattrs,
    "mtimes": mtimes,
    "sparse": sparse,
}


def populate_all(root: Path, caps: Any) -> list[str]:
    """Every part the host can make; returns the names of the parts that were skipped."""
    skipped = []
    for name, part in PARTS.items():
        try:
            part(root, caps)
        except pytest.skip.Exception:
            skipped.append(name)
    return skipped
