"""Space maps: the reference count of every block of a device, and which blocks are free.

The pool has two: the data space map counts references to data blocks (from mapping tree
leaves), the metadata space map counts references to metadata blocks (btree nodes, bitmaps, the
index block and the superblock). On disk each is a run of bitmap blocks holding 2 bits per block
(0 free, 1, 2, 3 = "look in the overflow tree"), an index of those bitmaps (a btree for data, a
single index block for metadata) and an overflow btree of exact counts for blocks counted 3 or
more times.

Here the counts live in memory (4 bytes a block) while the pool is open. A block freed in the
current transaction is not handed out again before the transaction commits: the committed
superblock may still reach it, and a crash must find it intact.
"""

from __future__ import annotations

import array
import logging

from graphdrivers.thinpool.errors import NoSpace
from graphdrivers.thinpool.format import ENTRIES_PER_BITMAP

log = logging.getLogger(__name__)


class SpaceMap:
    """Reference counts of ``nr_blocks`` blocks, with transaction-aware allocation."""

    def __init__(self, name: str, nr_blocks: int) -> None:
        self.name = name
        self.nr_blocks = nr_blocks
        self.counts = array.array("I", bytes(4 * nr_blocks))
        self.nr_allocated = 0
        self._new_in_txn: set[int] = set()
        self._freed_in_txn: set[int] = set()
        self.dirty_bitmaps: set[int] = set()
        self._cursor = 0
        self._high: set[int] = set()  # blocks counted 3 or more times

    def get(self, block: int) -> int:
        return self.counts[block]

    def set_loaded(self, block: int, count: int) -> None:
        """Set a count read from disk (no transaction bookkeeping)."""
        if count and not self.counts[block]:
            self.nr_allocated += 1
        self.counts[block] = count
        if count >= 3:
            self._high.add(block)

    def inc(self, block: int, by: int = 1) -> None:
        if not self.counts[block]:
            self.nr_allocated += 1
        self.counts[block] += by
        if self.counts[block] >= 3:
            self._high.add(block)
        self.dirty_bitmaps.add(block // ENTRIES_PER_BITMAP)

    def dec(self, block: int) -> int:
        """Drop one reference; returns the new count."""
        count = self.counts[block]
        if count == 0:
            raise AssertionError(f"{self.name} space map: block {block} freed twice")
        count -= 1
        self.counts[block] = count
        if count < 3:
            self._high.discard(block)
        self.dirty_bitmaps.add(block // ENTRIES_PER_BITMAP)
        if count == 0:
            self.nr_allocated -= 1
            if block in self._new_in_txn:
                self._new_in_txn.discard(block)  # never committed: reusable at once
            else:
                self._freed_in_txn.add(block)
        return count

    def is_new(self, block: int) -> bool:
        """True if the block was allocated in the current transaction."""
        return block in self._new_in_txn

    def alloc(self) -> int:
        """A free block, counted once, that the committed state does not use."""
        for start, stop in ((self._cursor, self.nr_blocks), (0, self._cursor)):
            pos = start
            while pos < stop:
                try:
                    block = self.counts.index(0, pos, stop)
                except ValueError:
                    break
                if block not in self._freed_in_txn:
                    self._cursor = block + 1
                    self.inc(block)
                    self._new_in_txn.add(block)
                    return block
                pos = block + 1
        raise NoSpace(f"{self.name} device is full ({self.nr_blocks} blocks in use)")

    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def end_transaction(self) -> None:
        """After a commit: blocks freed before it may be reused, none are new any more."""
        self._new_in_txn.clear()
        self._freed_in_txn.clear()
        self.dirty_bitmaps.clear()

    def bitmap_counts(self, index: int) -> list[int]:
        """The counts of the blocks one bitmap covers (the last bitmap may be short)."""
        start = index * ENTRIES_PER_BITMAP
        return list(self.counts[start : min(start + ENTRIES_PER_BITMAP, self.nr_blocks)])

    def nr_bitmaps(self) -> int:
        return -(-self.nr_blocks // ENTRIES_PER_BITMAP)

    def overflow(self) -> list[tuple[int, int]]:
        """(block, count) for every block counted 3 or more times, sorted by block."""
        return [(b, self.counts[b]) for b in sorted(self._high)]
