"""The on-disk format of dm-thin pool metadata: blocks, checksums, the superblock, btree nodes.

The metadata device is an array of 4 KiB blocks. Every block starts with a CRC-32C checksum of
the rest of the block (bytes 4..4095), XOR'ed with a salt that says what kind of block it is,
followed by the block's own number, checked on every read::

    block 0   superblock       the only block ever rewritten in place; it names every root
    block n   btree node       header, keys[max_entries], values[max_entries]
    block n   bitmap           2 bits of reference count per block of a space map
    block n   index            the metadata space map's list of its bitmap blocks

    superblock (offsets in bytes, little endian)
     0 csum u32   4 flags u32   8 blocknr u64   16 uuid[16]   32 magic u64   40 version u32
    44 time u32  48 trans_id u64  56 held_root u64
    64 data space map root [128]      nr_blocks, nr_allocated, bitmap_root, ref_count_root
   192 metadata space map root [128]  the same four u64s
   320 data_mapping_root u64  328 device_details_root u64
   336 data_block_size u32 (sectors)  340 metadata_block_size u32 (sectors, 8)
   344 metadata_nr_blocks u64  352 compat u32  356 compat_ro u32  360 incompat u32

    btree node header (32 bytes)
     0 csum u32   4 flags u32 (1 internal, 2 leaf)   8 blocknr u64
    16 nr_entries u32   20 max_entries u32   24 value_size u32   28 padding u32

This module only packs and unpacks; :mod:`graphdrivers.thinpool.btree`,
:mod:`graphdrivers.thinpool.spacemap` and :mod:`graphdrivers.thinpool.pool` give it meaning.
The layouts follow the kernel's persistent-data format, so ``thin_check`` and the kernel's
dm-thin target read what we write.
"""

from __future__ import annotations

import dataclasses
import struct

import crc32c

from graphdrivers.thinpool.errors import MetadataCorrupt

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
METADATA_BLOCK_SECTORS = BLOCK_SIZE // SECTOR_SIZE

SUPERBLOCK_MAGIC = 27022010
SUPERBLOCK_VERSION = 2
SUPERBLOCK_LOCATION = 0

# Checksum salts, one per block type.
SUPERBLOCK_CSUM_XOR = 160774
BTREE_CSUM_XOR = 121107
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478

INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER_SIZE = 32

BITMAP_HEADER_SIZE = 16
ENTRIES_PER_BITMAP = (BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4  # 2 bits each: 16320
INDEX_HEADER_SIZE = 16
INDEX_ENTRY_SIZE = 16
MAX_METADATA_BITMAPS = (BLOCK_SIZE - INDEX_HEADER_SIZE) // INDEX_ENTRY_SIZE  # 255
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP

# Reference counts of 3 and more live in an overflow btree; the bitmap says "3".
BITMAP_OVERFLOW = 3

MIN_DATA_BLOCK_SECTORS = 128  # 64 KiB
MAX_DATA_BLOCK_SECTORS = 2097152  # 1 GiB

TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DEVICE_ID = (1 << 24) - 1

_SUPERBLOCK = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
_SPACE_MAP_ROOT = struct.Struct("<QQQQ")
_NODE_HEADER = struct.Struct("<IIQIIII")
_DEVICE_DETAILS = struct.Struct("<QQII")
_INDEX_ENTRY = struct.Struct("<QII")


def checksum(block: bytes | bytearray | memoryview, salt: int) -> int:
    """The checksum a block of this type must carry in its first four bytes."""
    return int(crc32c.crc32c(bytes(block[4:]))) ^ 0xFFFFFFFF ^ salt


def seal(block: bytearray, salt: int) -> bytearray:
    """Write the checksum into a finished block (in place) and return it."""
    struct.pack_into("<I", block, 0, checksum(block, salt))
    return block


def verify(block: bytes, blocknr: int, salt: int, what: str) -> None:
    """Raise MetadataCorrupt unless ``block`` carries its checksum and its own number."""
    (stored,) = struct.unpack_from("<I", block, 0)
    if stored != checksum(block, salt):
        raise MetadataCorrupt(f"bad checksum in {what} (block {blocknr})")
    (location,) = struct.unpack_from("<Q", block, 8)
    if location != blocknr:
        raise MetadataCorrupt(f"{what} at block {blocknr} says it is block {location}")


def max_entries(value_size: int) -> int:
    """How many entries a btree node with values of this size holds (a multiple of 3)."""
    per_node = (BLOCK_SIZE - NODE_HEADER_SIZE) // (8 + value_size)
    return 3 * (per_node // 3)


@dataclasses.dataclass
class SpaceMapRoot:
    """The 32 meaningful bytes of a space map root in the superblock."""

    nr_blocks: int = 0
    nr_allocated: int = 0
    bitmap_root: int = 0
    ref_count_root: int = 0

    def pack(self) -> bytes:
        raw = _SPACE_MAP_ROOT.pack(
            self.nr_blocks, self.nr_allocated, self.bitmap_root, self.ref_count_root
        )
        return raw.ljust(128, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> SpaceMapRoot:
        return cls(*_SPACE_MAP_ROOT.unpack_from(raw, 0))


@dataclasses.dataclass
class Superblock:
    """Block 0: the committed state of the pool."""

    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm: SpaceMapRoot = dataclasses.field(default_factory=SpaceMapRoot)
    metadata_sm: SpaceMapRoot = dataclasses.field(default_factory=SpaceMapRoot)
    data_mapping_root: int = 0
    device_details_root: int = 0
    data_block_size: int = MIN_DATA_BLOCK_SECTORS
    metadata_nr_blocks: int = 0
    flags: int = 0
    version: int = SUPERBLOCK_VERSION
    uuid: bytes = b"\0" * 16

    def pack(self) -> bytearray:
        block = bytearray(BLOCK_SIZE)
        _SUPERBLOCK.pack_into(
            block,
            0,
            0,
            self.flags,
            SUPERBLOCK_LOCATION,
            self.uuid,
            SUPERBLOCK_MAGIC,
            self.version,
            self.time,
            self.trans_id,
            self.held_root,
            self.data_sm.pack(),
            self.metadata_sm.pack(),
            self.data_mapping_root,
            self.device_details_root,
            self.data_block_size,
            METADATA_BLOCK_SECTORS,
            self.metadata_nr_blocks,
            0,
            0,
            0,
        )
        return seal(block, SUPERBLOCK_CSUM_XOR)

    @classmethod
    def unpack(cls, block: bytes) -> Superblock:
        verify(block, SUPERBLOCK_LOCATION, SUPERBLOCK_CSUM_XOR, "superblock")
        (
            _csum,
            flags,
            _loc,
            uuid,
            magic,
            version,
            time,
            trans_id,
            held_root,
            data_sm,
            metadata_sm,
            mapping_root,
            details_root,
            data_block_size,
            meta_block_size,
            meta_nr_blocks,
            _compat,
            compat_ro,
            incompat,
        ) = _SUPERBLOCK.unpack_from(block, 0)
        if magic != SUPERBLOCK_MAGIC:
            raise MetadataCorrupt(f"superblock magic is {magic}, not {SUPERBLOCK_MAGIC}")
        if meta_block_size != METADATA_BLOCK_SECTORS:
            raise MetadataCorrupt(f"metadata block size {meta_block_size} sectors, not 8")
        if compat_ro or incompat:
            raise MetadataCorrupt("superblock sets feature flags this engine does not know")
        return cls(
            time=time,
            trans_id=trans_id,
            held_root=held_root,
            data_sm=SpaceMapRoot.unpack(data_sm),
            metadata_sm=SpaceMapRoot.unpack(metadata_sm),
            data_mapping_root=mapping_root,
            device_details_root=details_root,
            data_block_size=data_block_size,
            metadata_nr_blocks=meta_nr_blocks,
            flags=flags,
            version=version,
            uuid=uuid,
        )


@dataclasses.dataclass
class DeviceDetails:
    """The value of the device details tree: what the pool records of one thin device."""

    mapped_blocks: int = 0
    transaction_id: int = 0
    creation_time: int = 0
    snapshotted_time: int = 0

    SIZE = _DEVICE_DETAILS.size

    def pack(self) -> bytes:
        return _DEVICE_DETAILS.pack(
            self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time
        )

    @classmethod
    def unpack(cls, raw: bytes) -> DeviceDetails:
        return cls(*_DEVICE_DETAILS.unpack(raw))


@dataclasses.dataclass
class IndexEntry:
    """Where one bitmap of a space map lives, and a summary of it."""

    blocknr: int
    nr_free: int
    none_free_before: int

    SIZE = _INDEX_ENTRY.size

    def pack(self) -> bytes:
        return _INDEX_ENTRY.pack(self.blocknr, self.nr_free, self.none_free_before)

    @classmethod
    def unpack(cls, raw: bytes) -> IndexEntry:
        return cls(*_INDEX_ENTRY.unpack(raw))


def pack_mapping(data_block: int, time: int) -> int:
    """A level-2 mapping value: a 40-bit data block and the 24-bit pool time of the write."""
    return (data_block << TIME_BITS) | (time & TIME_MASK)


def unpack_mapping(value: int) -> tuple[int, int]:
    return value >> TIME_BITS, value & TIME_MASK


@dataclasses.dataclass
class NodeImage:
    """A decoded btree node: keys and raw values, as stored."""

    blocknr: int
    leaf: bool
    value_size: int
    keys: list[int]
    values: list[bytes]

    @property
    def max_entries(self) -> int:
        return max_entries(self.value_size)

    def pack(self) -> bytearray:
        cap = self.max_entries
        n = len(self.keys)
        if n > cap:
            raise ValueError(f"btree node {self.blocknr} holds {n} entries, max {cap}")
        block = bytearray(BLOCK_SIZE)
        _NODE_HEADER.pack_into(
            block,
            0,
            0,
            LEAF_NODE if self.leaf else INTERNAL_NODE,
            self.blocknr,
            n,
            cap,
            self.value_size,
            0,
        )
        struct.pack_into(f"<{n}Q", block, NODE_HEADER_SIZE, *self.keys)
        values_at = NODE_HEADER_SIZE + 8 * cap
        block[values_at : values_at + n * self.value_size] = b"".join(self.values)
        return seal(block, BTREE_CSUM_XOR)

    @classmethod
    def unpack(cls, block: bytes, blocknr: int) -> NodeImage:
        verify(block, blocknr, BTREE_CSUM_XOR, "btree node")
        _c, flags, _loc, n, cap, value_size, _pad = _NODE_HEADER.unpack_from(block, 0)
        if flags not in (INTERNAL_NODE, LEAF_NODE):
            raise MetadataCorrupt(f"btree node {blocknr} has flags {flags}")
        if n > cap or NODE_HEADER_SIZE + cap * (8 + value_size) > BLOCK_SIZE:
            raise MetadataCorrupt(f"btree node {blocknr} entry counts do not fit the block")
        keys = list(struct.unpack_from(f"<{n}Q", block, NODE_HEADER_SIZE))
        values_at = NODE_HEADER_SIZE + 8 * cap
        values = [
            bytes(block[values_at + i * value_size : values_at + (i + 1) * value_size])
            for i in range(n)
        ]
        return cls(blocknr, flags == LEAF_NODE, value_size, keys, values)


def pack_bitmap(blocknr: int, counts: list[int]) -> bytearray:
    """A space map bitmap block holding 2-bit counts (3 means: see the overflow tree)."""
    block = bytearray(BLOCK_SIZE)
    struct.pack_into("<IIQ", block, 0, 0, 0, blocknr)
    words = [0] * ((BLOCK_SIZE - BITMAP_HEADER_SIZE) // 8)
    for e, count in enumerate(counts):
        if count:
            v = min(count, BITMAP_OVERFLOW)
            shift = 2 * (e % 32)
            # Entry e keeps its high bit at bit 2e and its low bit at bit 2e+1 of the word.
            words[e // 32] |= ((v >> 1) << shift) | ((v & 1) << (shift + 1))
    struct.pack_into(f"<{len(words)}Q", block, BITMAP_HEADER_SIZE, *words)
    return seal(block, BITMAP_CSUM_XOR)


def unpack_bitmap(block: bytes, blocknr: int, nr_entries: int) -> list[int]:
    verify(block, blocknr, BITMAP_CSUM_XOR, "space map bitmap")
    nwords = (BLOCK_SIZE - BITMAP_HEADER_SIZE) // 8
    words = struct.unpack_from(f"<{nwords}Q", block, BITMAP_HEADER_SIZE)
    out = [0] * nr_entries
    for wi, w in enumerate(words):
        if not w or wi * 32 >= nr_entries:
            continue  # free space is all-zero words: skip it cheaply
        for e in range(wi * 32, min(wi * 32 + 32, nr_entries)):
            shift = 2 * (e % 32)
            out[e] = (((w >> shift) & 1) << 1) | ((w >> (shift + 1)) & 1)
    return out


def pack_index(blocknr: int, entries: list[IndexEntry]) -> bytearray:
    """The metadata space map's index block."""
    if len(entries) > MAX_METADATA_BITMAPS:
        raise ValueError("metadata space map needs more than 255 bitmaps")
    block = bytearray(BLOCK_SIZE)
    struct.pack_into("<IIQ", block, 0, 0, 0, blocknr)
    for i, entry in enumerate(entries):
        at = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE
        block[at : at + INDEX_ENTRY_SIZE] = entry.pack()
    return seal(block, INDEX_CSUM_XOR)


def unpack_index(block: bytes, blocknr: int, nr_bitmaps: int) -> list[IndexEntry]:
    verify(block, blocknr, INDEX_CSUM_XOR, "metadata index block")
    return [
        IndexEntry.unpack(block[INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE :][:INDEX_ENTRY_SIZE])
        for i in range(nr_bitmaps)
    ]
