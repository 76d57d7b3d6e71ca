"""Small verbs the checks are written in: make a layer with content, read its tree, diff it.

Everything here goes through the driver's public interface (create, mounted, diff,
apply_diff...), so the checks hold for any object that has it, not only for subclasses of
:class:`graphdrivers.driver.Driver`.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphdrivers.conformance.manifest import FS_OWN_NAMES, Manifest, manifest

Populate = Callable[[Path], object]

# moby graphtest's base layer: a sticky 0705 directory owned 1:2 and a setuid 0222 file.
BASE_DIR = "a subdir"
BASE_DIR_MODE = 0o705 | stat.S_ISVTX
BASE_FILE = "a file"
BASE_FILE_MODE = 0o222 | stat.S_ISUID
BASE_FILE_DATA = b"Some data"


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Run a block with the process umask set to ``value``."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def make_layer(
    driver: Any,
    layer_id: str,
    parent: str | None = None,
    populate: Populate | None = None,
    *,
    rw: bool = False,
) -> None:
    """Create a layer and, if given, run ``populate(root)`` on its mounted tree."""
    driver.create(layer_id, parent, rw=rw)
    if populate is not None:
        with driver.mounted(layer_id) as root:
            populate(Path(root))


def tree(driver: Any, layer_id: str, **kwargs: Any) -> Manifest:
    """The manifest of a layer's mounted tree (keyword arguments go to :func:`manifest`)."""
    with driver.mounted(layer_id, readonly=True) as root:
        return manifest(Path(root), **kwargs)


def listing(root: Path) -> list[str]:
    """The names in a directory, without the ones a filesystem makes itself."""
    return sorted(n for n in os.listdir(root) if n not in FS_OWN_NAMES)


def read_diff(driver: Any, layer_id: str, parent: str | None = None) -> bytes:
    """The whole diff stream of a layer, read and closed."""
    with driver.diff(layer_id, parent) as stream:
        data: bytes = stream.read()
    return data


def apply_bytes(driver: Any, layer_id: str, parent: str | None, data: bytes) -> int:
    """apply_diff from an in-memory tar."""
    size: int = driver.apply_diff(layer_id, parent, io.BytesIO(data))
    return size


def write(
    root: Path, rel: str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> Path:
    """Write a regular file (parents made 0755), then set owner, then mode."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def mkdir(root: Path, rel: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    path = root / rel
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def make_socket(path: Path) -> None:
    """Bind a unix socket at ``path`` (through /proc/self/fd, so long paths work) and close it."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def populate_base(root: Path) -> None:
    """moby's createBase content (call with umask 0)."""
    sub = root / BASE_DIR
    os.mkdir(sub, BASE_DIR_MODE)
    os.chown(sub, 1, 2)
    os.chmod(sub, BASE_DIR_MODE)
    f = root / BASE_FILE
    f.write_bytes(BASE_FILE_DATA)
    os.chmod(f, BASE_FILE_MODE)


def create_base(driver: Any, layer_id: str, parent: str | None = None) -> None:
    """moby graphtest's createBase: a writable layer with a sticky dir and a setuid file."""
    with umask(0):
        make_layer(driver, layer_id, parent, populate_base, rw=True)


def verify_base(root: Path) -> None:
    """moby graphtest's verifyBase, with messages naming what was wrong."""
    sub = os.lstat(root / BASE_DIR)
    assert stat.S_ISDIR(sub.st_mode), f"{BASE_DIR!r} is not a directory: {sub.st_mode:o}"
    assert stat.S_IMODE(sub.st_mode) == BASE_DIR_MODE, (
        f"{BASE_DIR!r} mode {stat.S_IMODE(sub.st_mode):04o}, expected {BASE_DIR_MODE:04o}"
    )
    assert (sub.st_uid, sub.st_gid) == (1, 2), (
        f"{BASE_DIR!r} owned {sub.st_uid}:{sub.st_gid}, expected 1:2"
    )

    f = os.lstat(root / BASE_FILE)
    assert stat.S_ISREG(f.st_mode), f"{BASE_FILE!r} is not a regular file: {f.st_mode:o}"
    assert stat.S_IMODE(f.st_mode) == BASE_FILE_MODE, (
        f"{BASE_FILE!r} mode {stat.S_IMODE(f.st_mode):04o}, expected {BASE_FILE_MODE:04o}"
    )
    assert (root / BASE_FILE).read_bytes() == BASE_FILE_DATA
    assert listing(root) == sorted([BASE_DIR, BASE_FILE]), f"entries: {listing(root)}"


def populated(
    driver: Any, layer_id: str, populate: Populate, parent: str | None = None, **kwargs: Any
) -> Manifest:
    """Create a layer, run ``populate(root)`` in it, return the manifest of what it holds."""
    driver.create(layer_id, parent)
    with driver.mounted(layer_id) as root:
        populate(Path(root))
        return manifest(Path(root), **kwargs)
