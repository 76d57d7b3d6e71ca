"""Open files and open directories, by the handle number the kernel passes back.

A :class:`FileHandle` remembers the node's *generation* at open: when another open copied the
file up in between, the next read or write reopens the node's current backing file, so an fd
opened read-only before the copy-up sees the new data (the kernel's page cache is shared
anyway, since the inode number does not change).
"""

from __future__ import annotations

import dataclasses
import itertools
import os

from fusemount.inodes import Node
from fusemount.layers import Layer


@dataclasses.dataclass(eq=False)
class FileHandle:
    node: Node
    fd: int
    flags: int
    generation: int


@dataclasses.dataclass(eq=False)
class DirHandle:
    node: Node
    entries: list[tuple[bytes, list[Layer]]] | None = None


class HandleTable:
    def __init__(self) -> None:
        self._next = itertools.count(1)
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}

    def add_file(self, handle: FileHandle) -> int:
        fh = next(self._next)
        self.files[fh] = handle
        handle.node.opens += 1
        return fh

    def add_dir(self, handle: DirHandle) -> int:
        fh = next(self._next)
        self.dirs[fh] = handle
        handle.node.opens += 1
        return fh

    def close(self) -> None:
        for handle in self.files.values():
            os.close(handle.fd)
        self.files.clear()
        self.dirs.clear()
