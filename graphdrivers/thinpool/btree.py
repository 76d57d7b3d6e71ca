"""Copy-on-write btrees over metadata blocks, as persistent-data keeps them.

Every tree of the pool (the two-level mapping tree, the device details tree, the space maps'
index and overflow trees) is a btree of 4 KiB nodes with u64 keys. Internal nodes map the lowest
key below each child to the child's block; leaves hold the values.

A committed node is never changed in place. To change one, the transaction *shadows* it: the
node is copied to a block allocated in this transaction, and the parent is made to point at the
copy (which shadows the parent, up to the root). A node already shadowed in this transaction and
referenced once is changed in place. A node referenced by more than one parent (a snapshot shares
its origin's tree) is copied, and the copy takes a new reference on everything the node points
to: child nodes, level-2 roots in a level-1 leaf, data blocks in a level-2 leaf. That is what
makes ``create_snap`` O(1): it only takes one more reference on the origin's level-2 root.

Dropping the last reference to a node frees it and drops one reference on everything it points
to, so deleting a device frees exactly the blocks nothing else shares.
"""

from __future__ import annotations

import bisect
import enum
import logging
import struct
from collections.abc import Callable, Iterator

from graphdrivers.thinpool.format import NodeImage, max_entries
from graphdrivers.thinpool.spacemap import SpaceMap

log = logging.getLogger(__name__)

U64 = struct.Struct("<Q")


class Refs(enum.Enum):
    """What the values of a tree's leaves point at, for reference counting."""

    NONE = "none"  # device details, space map entries: plain data
    METADATA = "metadata"  # level-1 mapping leaves: roots of level-2 trees
    DATA = "data"  # level-2 mapping leaves: data block << 24 | time


def u64(value: int) -> bytes:
    return U64.pack(value)


def as_u64(raw: bytes) -> int:
    return int(U64.unpack(raw)[0])


class NodeStore:
    """The nodes one transaction reads, shadows and writes, and the space maps it charges."""

    def __init__(
        self,
        read_block: Callable[[int], bytes],
        metadata_sm: SpaceMap,
        data_sm: SpaceMap,
    ) -> None:
        self._read_block = read_block
        self.metadata_sm = metadata_sm
        self.data_sm = data_sm
        self._cache: dict[int, NodeImage] = {}
        self.dirty: set[int] = set()

    def read(self, blocknr: int) -> NodeImage:
        node = self._cache.get(blocknr)
        if node is None:
            node = NodeImage.unpack(self._read_block(blocknr), blocknr)
            self._cache[blocknr] = node
        return node

    def new(self, leaf: bool, value_size: int) -> NodeImage:
        blocknr = self.metadata_sm.alloc()
        node = NodeImage(blocknr, leaf, value_size, [], [])
        self._cache[blocknr] = node
        self.dirty.add(blocknr)
        return node

    def shadow(self, blocknr: int, refs: Refs) -> NodeImage:
        """A writable version of the node: itself if private to this transaction, else a copy."""
        sm = self.metadata_sm
        if sm.is_new(blocknr) and sm.get(blocknr) == 1:
            self.dirty.add(blocknr)
            return self.read(blocknr)

        old = self.read(blocknr)
        copy = self.new(old.leaf, old.value_size)
        copy.keys = list(old.keys)
        copy.values = list(old.values)
        if sm.get(blocknr) > 1:
            self._inc_children(copy, refs)  # the copy is one more holder of each child
            sm.dec(blocknr)
        else:
            sm.dec(blocknr)  # the copy takes over the node's references; nothing else moves
            self._cache.pop(blocknr, None)
        return copy

    def _inc_children(self, node: NodeImage, refs: Refs) -> None:
        if not node.leaf:
            for raw in node.values:
                self.metadata_sm.inc(as_u64(raw))
        else:
            for raw in node.values:
                self.inc_value(raw, refs)

    def inc_value(self, raw: bytes, refs: Refs) -> None:
        if refs is Refs.METADATA:
            self.metadata_sm.inc(as_u64(raw))
        elif refs is Refs.DATA:
            self.data_sm.inc(as_u64(raw) >> 24)

    def dec_value(self, raw: bytes, refs: Refs) -> None:
        if refs is Refs.METADATA:
            self.release(as_u64(raw), Refs.DATA)
        elif refs is Refs.DATA:
            self.data_sm.dec(as_u64(raw) >> 24)

    def release(self, blocknr: int, refs: Refs) -> None:
        """Drop one reference to a node; the last one frees it and everything below it."""
        node = self.read(blocknr)
        if self.metadata_sm.dec(blocknr):
            return
        if not node.leaf:
            for raw in node.values:
                self.release(as_u64(raw), refs)
        else:
            for raw in node.values:
                self.dec_value(raw, refs)
        self._cache.pop(blocknr, None)
        self.dirty.discard(blocknr)

    def free_node(self, blocknr: int) -> None:
        """Free a node of this transaction whose references another node has taken over."""
        self.metadata_sm.dec(blocknr)
        self._cache.pop(blocknr, None)
        self.dirty.discard(blocknr)

    def forget(self) -> None:
        """Drop every cached node (after an abort, the blocks may mean something else)."""
        self._cache.clear()
        self.dirty.clear()

    def take_dirty(self) -> list[NodeImage]:
        nodes = [self._cache[b] for b in sorted(self.dirty)]
        self.dirty.clear()
        return nodes


def empty_tree(store: NodeStore, value_size: int) -> int:
    """A new tree: one leaf without entries."""
    return store.new(True, value_size).blocknr


def _child_index(node: NodeImage, key: int) -> int:
    return max(bisect.bisect_right(node.keys, key) - 1, 0)


def lookup(store: NodeStore, root: int, key: int) -> bytes | None:
    node = store.read(root)
    while not node.leaf:
        node = store.read(as_u64(node.values[_child_index(node, key)]))
    i = bisect.bisect_left(node.keys, key)
    if i < len(node.keys) and node.keys[i] == key:
        return node.values[i]
    return None


def insert(
    store: NodeStore, root: int, key: int, value: bytes, refs: Refs, *, release_old: bool = True
) -> int:
    """Insert or replace ``key``; returns the new root.

    A replaced value loses its reference unless ``release_old`` is false (for a level-2 root
    that shadowing has already replaced).
    """
    parts = _insert(store, root, key, value, refs, release_old)
    if len(parts) == 1:
        return parts[0][1]

    top = store.new(False, 8)
    top.keys = [k for k, _ in parts]
    top.values = [u64(b) for _, b in parts]
    return top.blocknr


def _insert(
    store: NodeStore, blocknr: int, key: int, value: bytes, refs: Refs, release_old: bool
) -> list[tuple[int, int]]:
    node = store.shadow(blocknr, refs)
    if node.leaf:
        i = bisect.bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            if release_old:
                store.dec_value(node.values[i], refs)
            node.values[i] = value
        else:
            node.keys.insert(i, key)
            node.values.insert(i, value)
    else:
        i = _child_index(node, key)
        parts = _insert(store, as_u64(node.values[i]), key, value, refs, release_old)
        node.keys[i], node.values[i] = parts[0][0], u64(parts[0][1])
        if len(parts) == 2:
            node.keys.insert(i + 1, parts[1][0])
            node.values.insert(i + 1, u64(parts[1][1]))

    if len(node.keys) <= max_entries(node.value_size):
        return [(node.keys[0], node.blocknr)]
    return _split(store, node)


def _split(store: NodeStore, node: NodeImage) -> list[tuple[int, int]]:
    half = len(node.keys) // 2
    right = store.new(node.leaf, node.value_size)
    right.keys, node.keys = node.keys[half:], node.keys[:half]
    right.values, node.values = node.values[half:], node.values[:half]
    return [(node.keys[0], node.blocknr), (right.keys[0], right.blocknr)]


def remove(store: NodeStore, root: int, key: int, refs: Refs, value_size: int) -> tuple[int, bool]:
    """Remove ``key`` (dropping its value's reference); returns (new root, whether found).

    Every node but the root keeps at least a third of its capacity, as the kernel's btrees
    do and ``thin_check`` demands: an underfull node borrows from or merges with a sibling.
    """
    if lookup(store, root, key) is None:
        return root, False

    new_root = _remove(store, root, key, refs)
    node = store.read(new_root)
    while not node.leaf and len(node.keys) == 1:
        only = as_u64(node.values[0])
        store.free_node(new_root)
        new_root, node = only, store.read(only)
    if not node.keys and not node.leaf:
        store.free_node(new_root)
        return empty_tree(store, value_size), True
    return new_root, True


def _remove(store: NodeStore, blocknr: int, key: int, refs: Refs) -> int:
    node = store.shadow(blocknr, refs)
    if node.leaf:
        i = bisect.bisect_left(node.keys, key)
        store.dec_value(node.values[i], refs)
        del node.keys[i], node.values[i]
        return node.blocknr

    i = _child_index(node, key)
    child = store.read(_remove(store, as_u64(node.values[i]), key, refs))
    node.values[i] = u64(child.blocknr)
    if child.keys:
        node.keys[i] = child.keys[0]
    if len(child.keys) < max_entries(child.value_size) // 3 and len(node.keys) > 1:
        _rebalance(store, node, i, refs)
    elif not child.keys:
        store.free_node(child.blocknr)
        del node.keys[i], node.values[i]
    return node.blocknr


def _rebalance(store: NodeStore, parent: NodeImage, i: int, refs: Refs) -> None:
    """Merge child ``i`` with a neighbour, or even out their entries if both cannot fit."""
    j = i + 1 if i + 1 < len(parent.keys) else i - 1
    lo, hi = min(i, j), max(i, j)
    left = store.shadow(as_u64(parent.values[lo]), refs)
    right = store.shadow(as_u64(parent.values[hi]), refs)
    keys, values = left.keys + right.keys, left.values + right.values

    if len(keys) <= max_entries(left.value_size):
        left.keys, left.values = keys, values
        store.free_node(right.blocknr)
        parent.keys[lo], parent.values[lo] = left.keys[0], u64(left.blocknr)
        del parent.keys[hi], parent.values[hi]
        return

    half = len(keys) // 2
    left.keys, left.values = keys[:half], values[:half]
    right.keys, right.values = keys[half:], values[half:]
    parent.keys[lo], parent.values[lo] = left.keys[0], u64(left.blocknr)
    parent.keys[hi], parent.values[hi] = right.keys[0], u64(right.blocknr)


def items(store: NodeStore, root: int) -> Iterator[tuple[int, bytes]]:
    """Every (key, value) of the tree in key order."""
    node = store.read(root)
    if node.leaf:
        yield from zip(node.keys, node.values, strict=True)
        return
    for raw in node.values:
        yield from items(store, as_u64(raw))


def node_blocks(store: NodeStore, root: int) -> Iterator[int]:
    """The block of every node of the tree (the tree itself, not what its leaves point at)."""
    yield root
    node = store.read(root)
    if not node.leaf:
        for raw in node.values:
            yield from node_blocks(store, as_u64(raw))


def _even_chunks(items: list[tuple[int, bytes]], cap: int) -> list[list[tuple[int, bytes]]]:
    """Split into as few chunks of at most ``cap`` as possible, all of about equal size."""
    count = -(-len(items) // cap)
    size, extra = divmod(len(items), count)
    chunks, start = [], 0
    for n in range(count):
        end = start + size + (1 if n < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def build(store: NodeStore, entries: list[tuple[int, bytes]], value_size: int) -> int:
    """A new tree holding ``entries`` (sorted by key), built bottom-up with even nodes."""
    if not entries:
        return empty_tree(store, value_size)

    level: list[tuple[int, bytes]] = []
    for chunk in _even_chunks(entries, max_entries(value_size)):
        leaf = store.new(True, value_size)
        leaf.keys = [k for k, _ in chunk]
        leaf.values = [v for _, v in chunk]
        level.append((leaf.keys[0], u64(leaf.blocknr)))

    while len(level) > 1:
        upper: list[tuple[int, bytes]] = []
        for chunk in _even_chunks(level, max_entries(8)):
            node = store.new(False, 8)
            node.keys = [k for k, _ in chunk]
            node.values = [v for _, v in chunk]
            upper.append((node.keys[0], u64(node.blocknr)))
        level = upper
    return as_u64(level[0][1])
