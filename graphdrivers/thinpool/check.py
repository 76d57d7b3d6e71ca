"""An independent checker of pool metadata that recounts every reference.

``thin_check`` (thin-provisioning-tools 0.9) verifies checksums and tree shapes but not the
reference counts of data blocks: a leaf re-checksummed to point at a block that another device
uses passes it. This checker reads the committed metadata from the file, without the pool's
in-memory state, and:

- walks every tree from the superblock, checking each node's checksum, location, key order and
  that its keys lie inside the range its parent gives it;
- counts references to every metadata block (the superblock, tree nodes, bitmaps, the index
  block) and to every data block (level-2 leaf entries), visiting a shared node's children once;
- compares both counts with what the space maps on disk say, block by block, and checks that
  each device's ``mapped_blocks`` equals its number of mappings.

:func:`check_pool` returns the list of problems found (empty when clean).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from graphdrivers.thinpool.btree import as_u64
from graphdrivers.thinpool.errors import MetadataCorrupt
from graphdrivers.thinpool.format import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    SUPERBLOCK_LOCATION,
    DeviceDetails,
    IndexEntry,
    NodeImage,
    Superblock,
    unpack_bitmap,
    unpack_index,
)


class _Reader:
    """Reads the blocks the walk asks for (a metadata file can be gigabytes of mostly holes)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.fd = os.dup(f.fileno())
        self.size = os.fstat(self.fd).st_size
        self.nodes: dict[int, NodeImage] = {}

    def close(self) -> None:
        os.close(self.fd)

    def block(self, blocknr: int) -> bytes:
        if (blocknr + 1) * BLOCK_SIZE > self.size:
            raise MetadataCorrupt(f"block {blocknr} lies past the end of the metadata")
        return os.pread(self.fd, BLOCK_SIZE, blocknr * BLOCK_SIZE)

    def node(self, blocknr: int) -> NodeImage:
        if blocknr not in self.nodes:
            self.nodes[blocknr] = NodeImage.unpack(self.block(blocknr), blocknr)
        return self.nodes[blocknr]


class _Walk:
    """Reference counts found by walking the trees."""

    def __init__(self, reader: _Reader, problems: list[str]) -> None:
        self.reader = reader
        self.problems = problems
        self.meta: collections.Counter[int] = collections.Counter()
        self.data: collections.Counter[int] = collections.Counter()
        self._expanded: set[int] = set()

    def tree(self, root: int, what: str, value_size: int) -> list[tuple[int, bytes]]:
        """Count the tree's nodes; return its leaf entries (a shared subtree's only once)."""
        out: list[tuple[int, bytes]] = []
        self._node(root, what, value_size, None, None, out)
        return out

    def _node(
        self,
        blocknr: int,
        what: str,
        value_size: int,
        low: int | None,
        high: int | None,
        out: list[tuple[int, bytes]],
    ) -> None:
        self.meta[blocknr] += 1
        if blocknr in self._expanded:
            return
        self._expanded.add(blocknr)
        try:
            node = self.reader.node(blocknr)
        except MetadataCorrupt as exc:
            self.problems.append(f"{what}: {exc}")
            return

        if low is not None and len(node.keys) < node.max_entries // 3:
            self.problems.append(
                f"{what}: node {blocknr} has {len(node.keys)} entries, fewer than a third "
                f"of {node.max_entries}"
            )
        if node.keys != sorted(set(node.keys)):
            self.problems.append(f"{what}: keys of node {blocknr} are not strictly increasing")
        if node.keys and low is not None and node.keys[0] < low:
            self.problems.append(f"{what}: node {blocknr} holds key {node.keys[0]} < {low}")
        if node.keys and high is not None and node.keys[-1] >= high:
            self.problems.append(f"{what}: node {blocknr} holds key {node.keys[-1]} >= {high}")

        if node.leaf:
            if node.value_size != value_size:
                self.problems.append(
                    f"{what}: leaf {blocknr} has {node.value_size}-byte values, "
                    f"expected {value_size}"
                )
            out.extend(zip(node.keys, node.values, strict=True))
            return
        for i, raw in enumerate(node.values):
            upper = node.keys[i + 1] if i + 1 < len(node.keys) else high
            self._node(as_u64(raw), what, value_size, node.keys[i], upper, out)


def _space_map_counts(
    reader: _Reader,
    bitmaps: list[IndexEntry],
    overflow: list[tuple[int, bytes]],
    nr_blocks: int,
    problems: list[str],
    what: str,
) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i, entry in enumerate(bitmaps):
        n = min(ENTRIES_PER_BITMAP, nr_blocks - i * ENTRIES_PER_BITMAP)
        try:
            values = unpack_bitmap(reader.block(entry.blocknr), entry.blocknr, n)
        except MetadataCorrupt as exc:
            problems.append(f"{what}: {exc}")
            continue
        base = i * ENTRIES_PER_BITMAP
        if any(values):
            counts.update((base + e, value) for e, value in enumerate(values) if value)
        if values.count(0) != entry.nr_free:  # the pool skips bitmaps whose index says all free
            problems.append(
                f"{what}: index says bitmap {i} has {entry.nr_free} free blocks, "
                f"it has {values.count(0)}"
            )
    for block, raw in overflow:
        if counts.get(block) != 3:
            problems.append(
                f"{what}: overflow count for block {block} but bitmap says {counts.get(block, 0)}"
            )
        counts[block] = int.from_bytes(raw, "little")
    return counts


def _compare(
    found: collections.Counter[int],
    stored: dict[int, int],
    what: str,
    problems: list[str],
    limit: int = 20,
) -> None:
    bad = [b for b in sorted(set(found) | set(stored)) if found.get(b, 0) != stored.get(b, 0)]
    for b in bad[:limit]:
        problems.append(
            f"{what} block {b}: referenced {found.get(b, 0)} time(s), space map says "
            f"{stored.get(b, 0)}"
        )
    if len(bad) > limit:
        problems.append(f"{what}: {len(bad) - limit} more blocks with wrong counts")


def check_pool(metadata_path: Path | str) -> list[str]:
    """Problems in the committed metadata of a pool (an empty list when it is clean)."""
    reader = _Reader(Path(metadata_path))
    try:
        return _check(reader)
    finally:
        reader.close()


def _check(reader: _Reader) -> list[str]:
    problems: list[str] = []
    try:
        sb = Superblock.unpack(reader.block(SUPERBLOCK_LOCATION))
    except MetadataCorrupt as exc:
        return [f"superblock: {exc}"]

    walk = _Walk(reader, problems)
    walk.meta[SUPERBLOCK_LOCATION] += 1

    details = {
        k: DeviceDetails.unpack(v)
        for k, v in walk.tree(sb.device_details_root, "device details tree", DeviceDetails.SIZE)
    }
    top = walk.tree(sb.data_mapping_root, "mapping tree", 8)
    for dev_id, raw in top:
        mapped = walk.tree(as_u64(raw), f"mapping tree of device {dev_id}", 8)
        for _vblock, value in mapped:
            block = as_u64(value) >> 24
            if block >= sb.data_sm.nr_blocks:
                problems.append(f"device {dev_id} maps data block {block} past the end")
            walk.data[block] += 1
        if dev_id not in details:
            problems.append(f"device {dev_id} has mappings but no details")
        else:
            count = _count_mappings(walk, reader, as_u64(raw))
            if details[dev_id].mapped_blocks != count:
                problems.append(
                    f"device {dev_id}: mapped_blocks {details[dev_id].mapped_blocks}"
                    f" but {count} mappings"
                )
    missing = set(details) - {k for k, _ in top}
    problems.extend(f"device {d} has details but no mapping tree" for d in sorted(missing))

    meta_bitmaps = unpack_index(
        reader.block(sb.metadata_sm.bitmap_root),
        sb.metadata_sm.bitmap_root,
        -(-sb.metadata_sm.nr_blocks // ENTRIES_PER_BITMAP),
    )
    walk.meta[sb.metadata_sm.bitmap_root] += 1
    for entry in meta_bitmaps:
        walk.meta[entry.blocknr] += 1
    meta_overflow = walk.tree(sb.metadata_sm.ref_count_root, "metadata overflow tree", 4)

    data_index = walk.tree(sb.data_sm.bitmap_root, "data space map index", IndexEntry.SIZE)
    data_bitmaps = [IndexEntry.unpack(v) for _, v in data_index]
    for entry in data_bitmaps:
        walk.meta[entry.blocknr] += 1
    data_overflow = walk.tree(sb.data_sm.ref_count_root, "data overflow tree", 4)

    stored_meta = _space_map_counts(
        reader,
        meta_bitmaps,
        meta_overflow,
        sb.metadata_sm.nr_blocks,
        problems,
        "metadata space map",
    )
    stored_data = _space_map_counts(
        reader, data_bitmaps, data_overflow, sb.data_sm.nr_blocks, problems, "data space map"
    )
    _compare(walk.meta, stored_meta, "metadata", problems)
    _compare(walk.data, stored_data, "data", problems)
    if sb.metadata_sm.nr_allocated != len(stored_meta):
        problems.append(
            f"metadata space map root says {sb.metadata_sm.nr_allocated} blocks "
            f"allocated, bitmaps say {len(stored_meta)}"
        )
    if sb.data_sm.nr_allocated != len(stored_data):
        problems.append(
            f"data space map root says {sb.data_sm.nr_allocated} blocks "
            f"allocated, bitmaps say {len(stored_data)}"
        )
    return problems


def _count_mappings(walk: _Walk, reader: _Reader, root: int) -> int:
    """Entries of a level-2 tree, counted along every path (shared subtrees included)."""
    node = reader.node(root)
    if node.leaf:
        return len(node.keys)
    return sum(_count_mappings(walk, reader, as_u64(raw)) for raw in node.values)
