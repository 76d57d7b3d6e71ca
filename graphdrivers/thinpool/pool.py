"""A thin pool in userspace, keeping its metadata in dm-thin's own on-disk format.

A pool is two files (or block devices): *metadata*, an array of 4 KiB blocks in the kernel's
format (:mod:`graphdrivers.thinpool.format`), and *data*, an array of data blocks (64 KiB by
default) that thin devices map their virtual blocks onto::

    superblock ──► data_mapping_root ──► level 1: dev id ─► level 2 root
                                                         level 2: virtual block ─► data block|time
               ──► device_details_root ─► dev id ─► mapped_blocks, transaction, creation/snap time
               ──► data space map      ─► index btree ─► bitmaps (+ overflow tree of counts ≥ 3)
               ──► metadata space map  ─► index block ─► bitmaps (+ overflow tree)

The pool answers the messages the kernel's thin-pool target takes: ``create_thin``,
``create_snap`` (O(1): the snapshot shares its origin's level-2 tree), ``delete`` (frees the
blocks no other device references) and ``set_transaction_id``. Each message commits. Writes to
a thin device become durable at the next :meth:`ThinPool.commit`, which writes every changed
metadata block to a block unused by the committed state, flushes both files, and then writes
the superblock: a process killed at any point leaves the pool at its last commit.

A write to a data block that a snapshot may share (its mapping is older than the device's last
snapshot, the kernel's rule) goes to a new data block; a write to a block the device owns alone
goes in place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

from graphdrivers.thinpool import btree
from graphdrivers.thinpool.btree import NodeStore, Refs, as_u64, u64
from graphdrivers.thinpool.errors import (
    DeviceExists,
    DeviceNotFound,
    MetadataCorrupt,
    ThinPoolError,
    TransactionMismatch,
)
from graphdrivers.thinpool.format import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    MAX_DATA_BLOCK_SECTORS,
    MAX_DEVICE_ID,
    MAX_METADATA_BLOCKS,
    MIN_DATA_BLOCK_SECTORS,
    SECTOR_SIZE,
    SUPERBLOCK_LOCATION,
    DeviceDetails,
    IndexEntry,
    SpaceMapRoot,
    Superblock,
    pack_bitmap,
    pack_index,
    pack_mapping,
    unpack_bitmap,
    unpack_index,
    unpack_mapping,
)
from graphdrivers.thinpool.spacemap import SpaceMap

log = logging.getLogger(__name__)

MAPPING_VALUE_SIZE = 8
INDEX_VALUE_SIZE = IndexEntry.SIZE
OVERFLOW_VALUE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    """What ``dmsetup status`` reports of a thin pool, in blocks."""

    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_root: int
    data_block_size: int  # sectors


@dataclasses.dataclass
class _SpaceMapLayout:
    """Where one space map's structures live on disk now (to free them at the next commit)."""

    bitmaps: list[IndexEntry]
    index_root: int = 0  # data: the index btree; metadata: the index block
    overflow_root: int = 0


class ThinPool:
    """An open pool. Use :meth:`format` to make one and :meth:`open` to reopen it."""

    def __init__(self, metadata_path: Path, data_path: Path) -> None:
        self.metadata_path = Path(metadata_path)
        self.data_path = Path(data_path)
        self._lock = threading.RLock()
        self._meta_fd = os.open(self.metadata_path, os.O_RDWR | os.O_CLOEXEC)
        self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
        self._details: dict[int, DeviceDetails] = {}
        self._dirty_details: set[int] = set()
        self._data_written = False
        self.sb = Superblock()

    # ------------------------------------------------------------------ opening

    @classmethod
    def format(
        cls,
        metadata_path: Path | str,
        data_path: Path | str,
        *,
        data_block_size: int = MIN_DATA_BLOCK_SECTORS,
        nr_data_blocks: int | None = None,
    ) -> ThinPool:
        """Write an empty pool over the metadata file; the data file's size gives its blocks."""
        if (
            data_block_size % MIN_DATA_BLOCK_SECTORS
            or not MIN_DATA_BLOCK_SECTORS <= data_block_size <= MAX_DATA_BLOCK_SECTORS
        ):
            raise ThinPoolError(
                f"data block size {data_block_size} sectors: must be a multiple of 128 "
                "between 128 (64 KiB) and 2097152 (1 GiB)"
            )
        pool = cls(Path(metadata_path), Path(data_path))
        block_bytes = data_block_size * SECTOR_SIZE
        if nr_data_blocks is None:
            nr_data_blocks = os.fstat(pool._data_fd).st_size // block_bytes
        nr_meta = min(os.fstat(pool._meta_fd).st_size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
        if nr_meta < 16 or nr_data_blocks < 1:
            pool.close()
            raise ThinPoolError("metadata needs at least 16 blocks and data at least 1 block")

        pool.sb = Superblock(data_block_size=data_block_size, metadata_nr_blocks=nr_meta)
        pool._metadata_sm = SpaceMap("metadata", nr_meta)
        pool._data_sm = SpaceMap("data", nr_data_blocks)
        pool._metadata_sm.inc(SUPERBLOCK_LOCATION)
        pool._store = NodeStore(pool._read_block, pool._metadata_sm, pool._data_sm)
        pool._data_layout = _SpaceMapLayout([])
        pool._meta_layout = _SpaceMapLayout([])
        pool.sb.data_mapping_root = btree.empty_tree(pool._store, MAPPING_VALUE_SIZE)
        pool.sb.device_details_root = btree.empty_tree(pool._store, DeviceDetails.SIZE)
        pool.commit()
        log.debug(
            "formatted pool: %d metadata blocks, %d data blocks of %d sectors",
            nr_meta,
            nr_data_blocks,
            data_block_size,
        )
        return pool

    @classmethod
    def open(cls, metadata_path: Path | str, data_path: Path | str) -> ThinPool:
        """Open a pool at its last committed transaction."""
        pool = cls(Path(metadata_path), Path(data_path))
        try:
            pool._load()
        except BaseException:
            pool.close()
            raise
        return pool

    def _load(self) -> None:
        block = self._read_block(SUPERBLOCK_LOCATION)
        if not any(block):
            raise MetadataCorrupt("metadata has no superblock (all zero): format the pool")
        self.sb = Superblock.unpack(block)
        self._metadata_sm = SpaceMap("metadata", self.sb.metadata_sm.nr_blocks)
        self._data_sm = SpaceMap("data", self.sb.data_sm.nr_blocks)
        self._store = NodeStore(self._read_block, self._metadata_sm, self._data_sm)

        meta_root = self.sb.metadata_sm
        entries = unpack_index(
            self._read_block(meta_root.bitmap_root),
            meta_root.bitmap_root,
            self._metadata_sm.nr_bitmaps(),
        )
        self._meta_layout = _SpaceMapLayout(
            entries, meta_root.bitmap_root, meta_root.ref_count_root
        )
        self._load_counts(self._metadata_sm, entries, meta_root.ref_count_root)

        data_root = self.sb.data_sm
        entries = [
            IndexEntry.unpack(v) for _, v in btree.items(self._store, data_root.bitmap_root)
        ]
        if len(entries) != self._data_sm.nr_bitmaps():
            raise MetadataCorrupt(
                f"data space map index lists {len(entries)} bitmaps, "
                f"expected {self._data_sm.nr_bitmaps()}"
            )
        self._data_layout = _SpaceMapLayout(
            entries, data_root.bitmap_root, data_root.ref_count_root
        )
        self._load_counts(self._data_sm, entries, data_root.ref_count_root)

        self._details = {
            key: DeviceDetails.unpack(raw)
            for key, raw in btree.items(self._store, self.sb.device_details_root)
        }
        self._dirty_details = set()
        self._metadata_sm.end_transaction()
        self._data_sm.end_transaction()

    def _load_counts(self, sm: SpaceMap, bitmaps: list[IndexEntry], overflow_root: int) -> None:
        for i, entry in enumerate(bitmaps):
            n = min(ENTRIES_PER_BITMAP, sm.nr_blocks - i * ENTRIES_PER_BITMAP)
            if entry.nr_free >= n:
                continue  # its index entry says all free: a big, young pool opens in O(used)
            counts = unpack_bitmap(self._read_block(entry.blocknr), entry.blocknr, n)
            base = i * ENTRIES_PER_BITMAP
            for e, count in enumerate(counts):
                if count:
                    sm.set_loaded(base + e, count)
        for block, raw in btree.items(self._store, overflow_root):
            sm.set_loaded(block, int.from_bytes(raw, "little"))

    def close(self) -> None:
        """Close the files; anything not committed is dropped."""
        for fd in (self._meta_fd, self._data_fd):
            if fd >= 0:
                os.close(fd)
        self._meta_fd = self._data_fd = -1

    def __enter__(self) -> ThinPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ block i/o

    def _read_block(self, blocknr: int) -> bytes:
        data = os.pread(self._meta_fd, BLOCK_SIZE, blocknr * BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            raise MetadataCorrupt(f"metadata block {blocknr} lies past the end of the device")
        return data

    def _write_block(self, blocknr: int, block: bytes | bytearray) -> None:
        os.pwrite(self._meta_fd, block, blocknr * BLOCK_SIZE)

    @property
    def data_block_bytes(self) -> int:
        return self.sb.data_block_size * SECTOR_SIZE

    # ------------------------------------------------------------------ transactions

    def commit(self) -> None:
        """Make every change so far durable; the superblock is written last."""
        with self._lock:
            for dev_id in sorted(self._dirty_details):
                self.sb.device_details_root = btree.insert(
                    self._store,
                    self.sb.device_details_root,
                    dev_id,
                    self._details[dev_id].pack(),
                    Refs.NONE,
                )
            self._dirty_details.clear()

            data_bitmaps = self._persist_data_space_map()
            meta_bitmaps = self._persist_metadata_space_map()

            for node in self._store.take_dirty():
                self._write_block(node.blocknr, node.pack())
            for sm, todo in ((self._data_sm, data_bitmaps), (self._metadata_sm, meta_bitmaps)):
                for index, blocknr in todo:
                    self._write_block(blocknr, pack_bitmap(blocknr, sm.bitmap_counts(index)))
            self._write_block(
                self._meta_layout.index_root,
                pack_index(self._meta_layout.index_root, self._meta_layout.bitmaps),
            )

            self.sb.data_sm = self._sm_root(self._data_sm, self._data_layout)
            self.sb.metadata_sm = self._sm_root(self._metadata_sm, self._meta_layout)
            if self._data_written:  # messages write no data: their commits skip this fsync
                os.fsync(self._data_fd)
                self._data_written = False
            os.fsync(self._meta_fd)
            self._write_block(SUPERBLOCK_LOCATION, self.sb.pack())
            os.fsync(self._meta_fd)

            self._metadata_sm.end_transaction()
            self._data_sm.end_transaction()

    def abort(self) -> None:
        """Drop everything since the last commit."""
        with self._lock:
            self._store.forget()
            self._load()

    @staticmethod
    def _sm_root(sm: SpaceMap, layout: _SpaceMapLayout) -> SpaceMapRoot:
        return SpaceMapRoot(sm.nr_blocks, sm.nr_allocated, layout.index_root, layout.overflow_root)

    def _release_tree(self, root: int) -> None:
        """Free a space map's own tree (its leaves point at nothing we count)."""
        if root:
            self._store.release(root, Refs.NONE)

    def _new_bitmap_block(self, layout: _SpaceMapLayout, sm: SpaceMap, index: int) -> int:
        """Move one bitmap to a fresh metadata block and refresh its index entry."""
        if index < len(layout.bitmaps):
            self._metadata_sm.dec(layout.bitmaps[index].blocknr)
        blocknr = self._metadata_sm.alloc()
        entry = IndexEntry(blocknr, 0, 0)
        if index < len(layout.bitmaps):
            layout.bitmaps[index] = entry
        else:
            layout.bitmaps.append(entry)
        return blocknr

    @staticmethod
    def _summarise(layout: _SpaceMapLayout, sm: SpaceMap, indices: list[int]) -> None:
        for i in indices:
            entry = layout.bitmaps[i]
            counts = sm.bitmap_counts(i)
            free = counts.count(0)
            entry.nr_free = free
            entry.none_free_before = counts.index(0) if free else len(counts)

    def _persist_data_space_map(self) -> list[tuple[int, int]]:
        sm, layout = self._data_sm, self._data_layout
        dirty = sorted(set(sm.dirty_bitmaps) | set(range(len(layout.bitmaps), sm.nr_bitmaps())))
        todo = [(i, self._new_bitmap_block(layout, sm, i)) for i in dirty]
        self._summarise(layout, sm, dirty)

        self._release_tree(layout.index_root)
        self._release_tree(layout.overflow_root)
        layout.index_root = btree.build(
            self._store, [(i, e.pack()) for i, e in enumerate(layout.bitmaps)], INDEX_VALUE_SIZE
        )
        layout.overflow_root = btree.build(
            self._store,
            [(b, c.to_bytes(4, "little")) for b, c in sm.overflow()],
            OVERFLOW_VALUE_SIZE,
        )
        return todo

    def _persist_metadata_space_map(self) -> list[tuple[int, int]]:
        sm, layout = self._metadata_sm, self._meta_layout
        if layout.index_root:
            sm.dec(layout.index_root)
        self._release_tree(layout.overflow_root)
        layout.index_root = sm.alloc()
        layout.overflow_root = btree.build(
            self._store,
            [(b, c.to_bytes(4, "little")) for b, c in sm.overflow()],
            OVERFLOW_VALUE_SIZE,
        )

        # Moving a bitmap allocates and frees metadata blocks, which can dirty other bitmaps:
        # repeat until every dirty bitmap has been given its new block.
        moved: dict[int, int] = {}
        missing = set(range(len(layout.bitmaps), sm.nr_bitmaps()))
        while True:
            pending = (set(sm.dirty_bitmaps) | missing) - set(moved)
            if not pending:
                break
            for index in sorted(pending):
                moved[index] = self._new_bitmap_block(layout, sm, index)
                missing.discard(index)
        self._summarise(layout, sm, sorted(moved))
        return sorted(moved.items())

    # ------------------------------------------------------------------ messages

    def create_thin(self, dev_id: int) -> None:
        """A new thin device with nothing mapped (reads as zeros)."""
        with self._lock:
            self._check_new_id(dev_id)
            root = btree.empty_tree(self._store, MAPPING_VALUE_SIZE)
            self.sb.data_mapping_root = btree.insert(
                self._store, self.sb.data_mapping_root, dev_id, u64(root), Refs.METADATA
            )
            self._set_details(
                dev_id, DeviceDetails(0, self.sb.trans_id, self.sb.time, self.sb.time)
            )
            self.commit()

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        """A new thin device sharing every block of ``origin_id``, in O(1)."""
        with self._lock:
            self._check_new_id(dev_id)
            root = self._device_root(origin_id)
            self._metadata_sm.inc(root)
            self.sb.data_mapping_root = btree.insert(
                self._store, self.sb.data_mapping_root, dev_id, u64(root), Refs.METADATA
            )

            self.sb.time += 1
            origin = self._details[origin_id]
            self._set_details(
                origin_id, dataclasses.replace(origin, snapshotted_time=self.sb.time)
            )
            self._set_details(
                dev_id,
                DeviceDetails(origin.mapped_blocks, self.sb.trans_id, self.sb.time, self.sb.time),
            )
            self.commit()

    def delete(self, dev_id: int) -> None:
        """Remove a device; data blocks no other device references become free."""
        with self._lock:
            self._device_root(dev_id)
            self.sb.data_mapping_root, _ = btree.remove(
                self._store,
                self.sb.data_mapping_root,
                dev_id,
                Refs.METADATA,
                MAPPING_VALUE_SIZE,
            )
            self.sb.device_details_root, _ = btree.remove(
                self._store,
                self.sb.device_details_root,
                dev_id,
                Refs.NONE,
                DeviceDetails.SIZE,
            )
            del self._details[dev_id]
            self._dirty_details.discard(dev_id)
            self.commit()

    def set_transaction_id(self, current: int, new: int) -> None:
        """Compare-and-swap of the userspace transaction id."""
        with self._lock:
            if current != self.sb.trans_id:
                raise TransactionMismatch(
                    f"set_transaction_id {current} {new}: the pool's id is {self.sb.trans_id}"
                )
            self.sb.trans_id = new
            self.commit()

    def _check_new_id(self, dev_id: int) -> None:
        if not 0 <= dev_id <= MAX_DEVICE_ID:
            raise ThinPoolError(f"device id {dev_id} is outside 0..{MAX_DEVICE_ID}")
        if dev_id in self._details:
            raise DeviceExists(f"thin device {dev_id} already exists")

    def _device_root(self, dev_id: int) -> int:
        raw = btree.lookup(self._store, self.sb.data_mapping_root, dev_id)
        if raw is None or dev_id not in self._details:
            raise DeviceNotFound(f"thin device {dev_id} does not exist")
        return as_u64(raw)

    def _set_details(self, dev_id: int, details: DeviceDetails) -> None:
        self._details[dev_id] = details
        self._dirty_details.add(dev_id)

    # ------------------------------------------------------------------ queries

    def devices(self) -> dict[int, DeviceDetails]:
        with self._lock:
            return {k: dataclasses.replace(v) for k, v in sorted(self._details.items())}

    def mappings(self, dev_id: int) -> list[tuple[int, int, int]]:
        """(virtual block, data block, time) of every mapped block of a device."""
        with self._lock:
            root = self._device_root(dev_id)
            return [(k, *unpack_mapping(as_u64(v))) for k, v in btree.items(self._store, root)]

    def status(self) -> PoolStatus:
        with self._lock:
            return PoolStatus(
                transaction_id=self.sb.trans_id,
                used_metadata_blocks=self._metadata_sm.nr_allocated,
                total_metadata_blocks=self._metadata_sm.nr_blocks,
                used_data_blocks=self._data_sm.nr_allocated,
                total_data_blocks=self._data_sm.nr_blocks,
                held_root=self.sb.held_root,
                data_block_size=self.sb.data_block_size,
            )

    def device(self, dev_id: int) -> ThinDevice:
        """A handle for reading and writing one thin device."""
        with self._lock:
            self._device_root(dev_id)
        return ThinDevice(self, dev_id)

    # ------------------------------------------------------------------ block mapping

    def _lookup(self, dev_id: int, vblock: int) -> tuple[int, int] | None:
        raw = btree.lookup(self._store, self._device_root(dev_id), vblock)
        return unpack_mapping(as_u64(raw)) if raw is not None else None

    def _map(self, dev_id: int, vblock: int, data_block: int) -> None:
        root = self._device_root(dev_id)
        new_root = btree.insert(
            self._store, root, vblock, u64(pack_mapping(data_block, self.sb.time)), Refs.DATA
        )
        if new_root != root:
            self.sb.data_mapping_root = btree.insert(
                self._store,
                self.sb.data_mapping_root,
                dev_id,
                u64(new_root),
                Refs.METADATA,
                release_old=False,
            )

    def read_block(self, dev_id: int, vblock: int) -> bytes:
        with self._lock:
            mapping = self._lookup(dev_id, vblock)
            if mapping is None:
                return bytes(self.data_block_bytes)
            return self._read_data(mapping[0])

    def read_into(self, dev_id: int, offset: int, buf: bytearray) -> None:
        """Fill ``buf`` (zeroed by the caller) from the device at byte ``offset``.

        Runs of virtual blocks mapped to consecutive data blocks are read with one ``preadv``
        straight into ``buf``; unmapped blocks are left as the caller's zeros. A sequential
        read of a freshly written device is mostly such runs, so this is one system call per
        request instead of one per data block and two copies fewer.
        """
        size = self.data_block_bytes
        view = memoryview(buf)
        with self._lock:
            run_start = run_disk = run_len = 0
            done = 0
            while done < len(buf):
                vblock, within = divmod(offset + done, size)
                n = min(len(buf) - done, size - within)
                mapping = self._lookup(dev_id, vblock)
                disk = mapping[0] * size + within if mapping is not None else -1
                if run_len and disk == run_disk + run_len:
                    run_len += n
                else:
                    self._read_run(view, run_start, run_disk, run_len)
                    run_start, run_disk, run_len = done, disk, n if disk >= 0 else 0
                done += n
            self._read_run(view, run_start, run_disk, run_len)

    def _read_run(self, view: memoryview, start: int, disk: int, length: int) -> None:
        if length:  # a sparse data file may end early: what is not read stays zero
            os.preadv(self._data_fd, [view[start : start + length]], disk)

    def _read_data(self, data_block: int) -> bytes:
        size = self.data_block_bytes
        data = os.pread(self._data_fd, size, data_block * size)
        return data.ljust(size, b"\0")  # a sparse data file may end before the block does

    def write_block(self, dev_id: int, vblock: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` inside one virtual block, breaking sharing first."""
        size = self.data_block_bytes
        if offset < 0 or offset + len(data) > size:
            raise ValueError("write_block: the write must stay inside one block")
        with self._lock:
            mapping = self._lookup(dev_id, vblock)
            details = self._details[dev_id]
            self._data_written = True
            if mapping is not None and mapping[1] >= details.snapshotted_time:
                os.pwrite(self._data_fd, data, mapping[0] * size + offset)
                return

            new_block = self._data_sm.alloc()
            if len(data) == size:
                block = data
            else:
                base = bytearray(self._read_data(mapping[0]) if mapping else bytes(size))
                base[offset : offset + len(data)] = data
                block = bytes(base)
            os.pwrite(self._data_fd, block, new_block * size)
            self._map(dev_id, vblock, new_block)
            if mapping is None:
                self._set_details(
                    dev_id, dataclasses.replace(details, mapped_blocks=details.mapped_blocks + 1)
                )


class ThinDevice:
    """Byte-addressed reads and writes of one thin device (its size is the caller's business)."""

    def __init__(self, pool: ThinPool, dev_id: int) -> None:
        self.pool = pool
        self.dev_id = dev_id

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        self.pool.read_into(self.dev_id, offset, out)
        return bytes(out)

    def pwrite(self, data: bytes, offset: int) -> int:
        size = self.pool.data_block_bytes
        view = memoryview(data)
        done = 0
        while done < len(data):
            vblock, within = divmod(offset + done, size)
            n = min(len(data) - done, size - within)
            self.pool.write_block(self.dev_id, vblock, within, bytes(view[done : done + n]))
            done += n
        return done

    def flush(self) -> None:
        self.pool.commit()
