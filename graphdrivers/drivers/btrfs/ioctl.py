"""The btrfs ioctls the btrfs driver needs, with the kernel's struct layouts.

Everything the driver asks of btrfs goes through :func:`fcntl.ioctl` on a file descriptor of a
directory inside the filesystem. The structures below are :mod:`ctypes` mirrors of the ones in
the kernel's ``include/uapi/linux/btrfs.h``; their sizes are part of each ioctl's number (the
``_IOW``/``_IOR`` encoding), so a wrong layout is refused by the kernel with ``ENOTTY`` rather
than misread. Every structure is checked against the size the kernel expects at import time.

The btrfs ideas the wrappers rely on:

subvolume
    An independent file tree (its own b-tree, the "FS tree") that looks like a directory. Its
    root directory always has inode number 256 (``BTRFS_FIRST_FREE_OBJECTID``), and it has its
    own id (the tree id), by which qgroups and the root tree know it.
snapshot
    A new subvolume that starts sharing every block of a source subvolume; only the root node
    of the tree is copied, so it costs the same whatever the source holds.
root tree
    Tree 1, which lists every subvolume: a ``ROOT_ITEM`` per subvolume, and ``ROOT_REF`` items
    that say which subvolume contains which (and in which directory, under what name).
qgroup
    A quota group. With quotas enabled, every subvolume gets qgroup ``0/<tree id>`` counting
    the bytes it references (``rfer``) and the bytes only it references (``excl``); a limit on
    either makes writes past it fail with ``EDQUOT``.
generation (transid)
    The number of the transaction that last wrote something. Every tree block and inode
    records one, which is what :func:`tree_search` can filter on.

Most of these ioctls need ``CAP_SYS_ADMIN`` (tree search, destroy, quota control); the driver
runs as root.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

# ----------------------------------------------------------------- constants from btrfs.h / ctree

BTRFS_IOCTL_MAGIC = 0x94
BTRFS_SUPER_MAGIC = 0x9123683E  # statfs(2) f_type of a btrfs filesystem

BTRFS_PATH_NAME_MAX = 4087
BTRFS_SUBVOL_NAME_MAX = 4039
BTRFS_INO_LOOKUP_PATH_MAX = 4080
BTRFS_VOL_NAME_MAX = 255
BTRFS_UUID_SIZE = 16

# Object ids and tree ids.
BTRFS_ROOT_TREE_OBJECTID = 1  # the tree of subvolume roots
BTRFS_FS_TREE_OBJECTID = 5  # the top-level subvolume
BTRFS_QUOTA_TREE_OBJECTID = 8  # qgroup status, info and limit items
BTRFS_FIRST_FREE_OBJECTID = 256  # inode number of every subvolume's root directory
BTRFS_EMPTY_SUBVOL_DIR_OBJECTID = 2  # placeholder a snapshot shows for a nested subvolume
BTRFS_LAST_FREE_OBJECTID = 2**64 - 256

# Item types (the middle member of a b-tree key).
BTRFS_INODE_ITEM_KEY = 1
BTRFS_INODE_REF_KEY = 12
BTRFS_DIR_ITEM_KEY = 84
BTRFS_DIR_INDEX_KEY = 96
BTRFS_EXTENT_DATA_KEY = 108
BTRFS_ROOT_ITEM_KEY = 132
BTRFS_ROOT_REF_KEY = 156
BTRFS_QGROUP_STATUS_KEY = 240
BTRFS_QGROUP_INFO_KEY = 242
BTRFS_QGROUP_LIMIT_KEY = 244

# Flags.
BTRFS_SUBVOL_RDONLY = 1 << 1  # vol_args_v2.flags and SUBVOL_{GET,SET}FLAGS
BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0  # the same fact in root_item.flags (GET_SUBVOL_INFO)
BTRFS_QGROUP_LIMIT_MAX_RFER = 1 << 0
BTRFS_QGROUP_LIMIT_MAX_EXCL = 1 << 1
BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_QGROUP_STATUS_FLAG_ON = 1 << 0
BTRFS_QGROUP_STATUS_FLAG_RESCAN = 1 << 1
BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT = 1 << 2
BTRFS_QUOTA_CTL_DISABLE = 2

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


# ----------------------------------------------------------------- ioctl number encoding

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux's ``_IOC(dir, type, nr, size)``: the request number carries the argument size."""
    return (direction << 30) | (size << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: type[ctypes._CData]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype))


def _ior(nr: int, ctype: type[ctypes._CData]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype: type[ctypes._CData]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype))


# ----------------------------------------------------------------- structures


class VolArgs(ctypes.Structure):
    """``struct btrfs_ioctl_vol_args`` (4096 bytes): an fd and a name (one path component)."""

    _fields_ = [("fd", ctypes.c_int64), ("name", ctypes.c_char * (BTRFS_PATH_NAME_MAX + 1))]


class VolArgsV2(ctypes.Structure):
    """``struct btrfs_ioctl_vol_args_v2`` (4096 bytes): fd, transid, flags, 32 unused bytes
    (size and qgroup_inherit pointer in a union), then the name (or a subvolume id)."""

    _fields_ = [
        ("fd", ctypes.c_int64),
        ("transid", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("unused", ctypes.c_uint64 * 4),
        ("name", ctypes.c_char * (BTRFS_SUBVOL_NAME_MAX + 1)),
    ]


class InoLookupArgs(ctypes.Structure):
    """``struct btrfs_ioctl_ino_lookup_args`` (4096 bytes): tree id and inode in, path out."""

    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("name", ctypes.c_char * BTRFS_INO_LOOKUP_PATH_MAX),
    ]


class SearchKey(ctypes.Structure):
    """``struct btrfs_ioctl_search_key`` (104 bytes): which tree, the key range and the
    transid range to return, and how many items fit (in: asked, out: returned)."""

    _fields_ = [
        ("tree_id", ctypes.c_uint64),
        ("min_objectid", ctypes.c_uint64),
        ("max_objectid", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint64),
        ("max_offset", ctypes.c_uint64),
        ("min_transid", ctypes.c_uint64),
        ("max_transid", ctypes.c_uint64),
        ("min_type", ctypes.c_uint32),
        ("max_type", ctypes.c_uint32),
        ("nr_items", ctypes.c_uint32),
        ("unused", ctypes.c_uint32),
        ("unused1", ctypes.c_uint64 * 4),
    ]


class SearchHeader(ctypes.Structure):
    """``struct btrfs_ioctl_search_header`` (32 bytes), one before each item in the buffer."""

    _fields_ = [
        ("transid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


SEARCH_BUF_SIZE = 4096 - ctypes.sizeof(SearchKey)


class SearchArgs(ctypes.Structure):
    """``struct btrfs_ioctl_search_args`` (4096 bytes): the key, then headers and items."""

    _fields_ = [("key", SearchKey), ("buf", ctypes.c_uint8 * SEARCH_BUF_SIZE)]


class QuotaCtlArgs(ctypes.Structure):
    """``struct btrfs_ioctl_quota_ctl_args`` (16 bytes): a command and its status."""

    _fields_ = [("cmd", ctypes.c_uint64), ("status", ctypes.c_uint64)]


class QgroupLimit(ctypes.Structure):
    """``struct btrfs_qgroup_limit`` (40 bytes): which limits are set, and their values."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


class QgroupLimitArgs(ctypes.Structure):
    """``struct btrfs_ioctl_qgroup_limit_args`` (48 bytes): a qgroup id and its limit."""

    _fields_ = [("qgroupid", ctypes.c_uint64), ("lim", QgroupLimit)]


class QgroupCreateArgs(ctypes.Structure):
    """``struct btrfs_ioctl_qgroup_create_args`` (16 bytes): create (1) or delete (0) a qgroup."""

    _fields_ = [("create", ctypes.c_uint64), ("qgroupid", ctypes.c_uint64)]


class QuotaRescanArgs(ctypes.Structure):
    """``struct btrfs_ioctl_quota_rescan_args`` (64 bytes): flags and progress."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("progress", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


class Timespec(ctypes.Structure):
    """``struct btrfs_ioctl_timespec`` (16 bytes with its tail padding)."""

    _fields_ = [("sec", ctypes.c_uint64), ("nsec", ctypes.c_uint32)]


class GetSubvolInfoArgs(ctypes.Structure):
    """``struct btrfs_ioctl_get_subvol_info_args`` (504 bytes): facts about one subvolume."""

    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("name", ctypes.c_char * (BTRFS_VOL_NAME_MAX + 1)),
        ("parent_id", ctypes.c_uint64),
        ("dirid", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("parent_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("received_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("ctransid", ctypes.c_uint64),
        ("otransid", ctypes.c_uint64),
        ("stransid", ctypes.c_uint64),
        ("rtransid", ctypes.c_uint64),
        ("ctime", Timespec),
        ("otime", Timespec),
        ("stime", Timespec),
        ("rtime", Timespec),
        ("reserved", ctypes.c_uint64 * 8),
    ]


_EXPECTED_SIZES = {
    VolArgs: 4096,
    VolArgsV2: 4096,
    InoLookupArgs: 4096,
    SearchKey: 104,
    SearchHeader: 32,
    SearchArgs: 4096,
    QuotaCtlArgs: 16,
    QgroupLimit: 40,
    QgroupLimitArgs: 48,
    QgroupCreateArgs: 16,
    QuotaRescanArgs: 64,
    Timespec: 16,
    GetSubvolInfoArgs: 504,
}
for _ctype, _size in _EXPECTED_SIZES.items():
    assert ctypes.sizeof(_ctype) == _size, (_ctype.__name__, ctypes.sizeof(_ctype), _size)

# ----------------------------------------------------------------- ioctl numbers

BTRFS_IOC_SYNC = _io(8)
BTRFS_IOC_SUBVOL_CREATE = _iow(14, VolArgs)
BTRFS_IOC_SNAP_DESTROY = _iow(15, VolArgs)
BTRFS_IOC_TREE_SEARCH = _iowr(17, SearchArgs)
BTRFS_IOC_INO_LOOKUP = _iowr(18, InoLookupArgs)
BTRFS_IOC_SNAP_CREATE_V2 = _iow(23, VolArgsV2)
BTRFS_IOC_SUBVOL_GETFLAGS = _ior(25, ctypes.c_uint64)
BTRFS_IOC_SUBVOL_SETFLAGS = _iow(26, ctypes.c_uint64)
BTRFS_IOC_QUOTA_CTL = _iowr(40, QuotaCtlArgs)
BTRFS_IOC_QGROUP_CREATE = _iow(42, QgroupCreateArgs)
BTRFS_IOC_QGROUP_LIMIT = _ior(43, QgroupLimitArgs)  # _IOR in the kernel header, though it writes
BTRFS_IOC_QUOTA_RESCAN = _iow(44, QuotaRescanArgs)
BTRFS_IOC_QUOTA_RESCAN_WAIT = _io(46)
BTRFS_IOC_GET_SUBVOL_INFO = _ior(60, GetSubvolInfoArgs)


def _call(fd: int, request: int, arg: ctypes._CData | int = 0) -> None:
    """``ioctl(fd, request, &arg)``; the kernel's answer is written back into ``arg``."""
    if isinstance(arg, int):
        fcntl.ioctl(fd, request, arg)
    else:
        fcntl.ioctl(fd, request, arg, True)  # type: ignore[call-overload]


def _name_bytes(name: str, limit: int) -> bytes:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or raw in (b".", b"..") or len(raw) > limit:
        raise OSError(errno.EINVAL, f"not a valid subvolume name: {name!r}")
    return raw


# ----------------------------------------------------------------- subvolumes


def subvolume_create(dir_fd: int, name: str) -> None:
    """BTRFS_IOC_SUBVOL_CREATE: make an empty subvolume ``name`` inside directory ``dir_fd``.

    ``vol_args.name`` is the new entry's name, ``vol_args.fd`` is unused. The driver uses it for
    a layer without a parent. The new root directory's mode follows the umask and its owner is
    the caller, so the driver sets both afterwards.
    """
    args = VolArgs(fd=0, name=_name_bytes(name, BTRFS_PATH_NAME_MAX))
    _call(dir_fd, BTRFS_IOC_SUBVOL_CREATE, args)


def snapshot_create(source_fd: int, dir_fd: int, name: str, *, readonly: bool = False) -> None:
    """BTRFS_IOC_SNAP_CREATE_V2: snapshot the subvolume open as ``source_fd`` to ``dir_fd/name``.

    ``vol_args_v2.fd`` is the source subvolume's root, ``flags`` may carry
    ``BTRFS_SUBVOL_RDONLY`` for a read-only snapshot, and the ioctl goes to the destination
    directory. A snapshot of a read-only subvolume is writable unless asked otherwise. This is
    how a child layer is made from its parent in O(1). Nested subvolumes are not part of a
    snapshot: they appear in it as empty directories (inode 2).
    """
    args = VolArgsV2(
        fd=source_fd,
        flags=BTRFS_SUBVOL_RDONLY if readonly else 0,
        name=_name_bytes(name, BTRFS_SUBVOL_NAME_MAX),
    )
    _call(dir_fd, BTRFS_IOC_SNAP_CREATE_V2, args)


def subvolume_destroy(dir_fd: int, name: str) -> None:
    """BTRFS_IOC_SNAP_DESTROY: delete the subvolume ``dir_fd/name`` with all its files.

    The entry disappears at once; the blocks are freed later by the kernel's cleaner thread.
    Works on read-only subvolumes too, but not on one that still contains nested subvolumes
    (``ENOTEMPTY``), nor inside a read-only parent subvolume (``EROFS``): the driver deletes
    nested subvolumes first and clears the read-only flag where needed.
    """
    args = VolArgs(fd=0, name=_name_bytes(name, BTRFS_PATH_NAME_MAX))
    _call(dir_fd, BTRFS_IOC_SNAP_DESTROY, args)


def get_flags(subvol_fd: int) -> int:
    """BTRFS_IOC_SUBVOL_GETFLAGS: the subvolume's flags (a ``__u64``; RDONLY is the one used)."""
    value = ctypes.c_uint64(0)
    _call(subvol_fd, BTRFS_IOC_SUBVOL_GETFLAGS, value)
    return int(value.value)


def set_flags(subvol_fd: int, flags: int) -> None:
    """BTRFS_IOC_SUBVOL_SETFLAGS: replace the subvolume's flags (``fd`` must be its root)."""
    _call(subvol_fd, BTRFS_IOC_SUBVOL_SETFLAGS, ctypes.c_uint64(flags))


def is_readonly(subvol_fd: int) -> bool:
    return bool(get_flags(subvol_fd) & BTRFS_SUBVOL_RDONLY)


def set_readonly(subvol_fd: int, readonly: bool) -> None:
    """Set or clear ``BTRFS_SUBVOL_RDONLY``, keeping the other flags; no-op if already so.

    A read-only subvolume refuses every change to its files (``EROFS``) but can still be
    snapshotted and deleted; the driver makes a layer read-only once it has a child.
    """
    flags = get_flags(subvol_fd)
    new = flags | BTRFS_SUBVOL_RDONLY if readonly else flags & ~BTRFS_SUBVOL_RDONLY
    if new != flags:
        set_flags(subvol_fd, new)


def ino_lookup(fd: int, treeid: int, objectid: int) -> tuple[int, str]:
    """BTRFS_IOC_INO_LOOKUP: the path of inode ``objectid`` in subvolume ``treeid``.

    In: ``treeid`` (0 means the subvolume ``fd`` is in) and ``objectid``. Out: ``treeid`` (made
    concrete) and ``name``, the directory path relative to the subvolume root with a trailing
    ``/`` ("" for the root itself). The driver uses it to learn a layer's subvolume id and
    where inside a layer a nested subvolume hangs.
    """
    args = InoLookupArgs(treeid=treeid, objectid=objectid)
    _call(fd, BTRFS_IOC_INO_LOOKUP, args)
    return int(args.treeid), os.fsdecode(args.name)


def subvolume_id(fd: int) -> int:
    """The tree id of the subvolume that ``fd`` belongs to (also its level-0 qgroup id)."""
    treeid, _ = ino_lookup(fd, 0, BTRFS_FIRST_FREE_OBJECTID)
    return treeid


@dataclasses.dataclass(frozen=True)
class SubvolInfo:
    """What BTRFS_IOC_GET_SUBVOL_INFO says about one subvolume."""

    id: int
    name: str
    parent_id: int
    generation: int  # transid of the last change
    otransid: int  # transid when it was created (for a snapshot: when it was taken)
    flags: int  # root_item flags: read-only is BTRFS_ROOT_SUBVOL_RDONLY, not SUBVOL_RDONLY
    uuid: bytes
    parent_uuid: bytes  # uuid of the snapshot source; all zero for a plain subvolume


def subvolume_info(subvol_fd: int) -> SubvolInfo:
    """BTRFS_IOC_GET_SUBVOL_INFO: id, name, generations, flags and uuids of ``subvol_fd``'s
    subvolume; shown in :meth:`BtrfsDriver.metadata` and used by the generation-based diff."""
    args = GetSubvolInfoArgs()
    _call(subvol_fd, BTRFS_IOC_GET_SUBVOL_INFO, args)
    return SubvolInfo(
        id=int(args.treeid),
        name=os.fsdecode(args.name),
        parent_id=int(args.parent_id),
        generation=int(args.generation),
        otransid=int(args.otransid),
        flags=int(args.flags),
        uuid=bytes(args.uuid),
        parent_uuid=bytes(args.parent_uuid),
    )


def sync(fd: int) -> None:
    """BTRFS_IOC_SYNC: commit the running transaction and wake the cleaner thread.

    Deleted subvolumes are dropped by the cleaner after a commit; the driver calls this when it
    must wait for a drop (to delete a qgroup) instead of waiting for the 30-second commit timer.
    """
    _call(fd, BTRFS_IOC_SYNC)


# ----------------------------------------------------------------- tree search


@dataclasses.dataclass(frozen=True)
class Item:
    """One b-tree item returned by :func:`tree_search`: its key, transid and raw payload."""

    objectid: int
    type: int
    offset: int
    transid: int
    data: bytes


def tree_search(
    fd: int,
    tree_id: int,
    *,
    min_key: tuple[int, int, int] = (0, 0, 0),
    max_key: tuple[int, int, int] = (U64_MAX, 255, U64_MAX),
    min_transid: int = 0,
    types: frozenset[int] | None = None,
) -> Iterator[Item]:
    """BTRFS_IOC_TREE_SEARCH: every item of tree ``tree_id`` with a key in [min_key, max_key].

    Keys are (objectid, type, offset) and ordered that way. The kernel fills the 3992-byte
    buffer with (search_header, item) pairs and says how many in ``nr_items``; the search is
    resumed just after the last key returned until the range is exhausted. ``min_transid``
    makes the kernel skip tree blocks not written since that transaction, which is how
    ``btrfs subvolume find-new`` finds recent changes without reading the whole tree. The key
    range is lexicographic, so items of other types can fall inside it: ``types`` filters.
    """
    key = list(min_key)
    header_size = ctypes.sizeof(SearchHeader)
    while True:
        args = SearchArgs()
        args.key.tree_id = tree_id
        args.key.min_objectid, args.key.min_type, args.key.min_offset = key
        args.key.max_objectid, args.key.max_type, args.key.max_offset = max_key
        args.key.min_transid = min_transid
        args.key.max_transid = U64_MAX
        args.key.nr_items = 4096
        _call(fd, BTRFS_IOC_TREE_SEARCH, args)
        if args.key.nr_items == 0:
            return

        raw = bytes(args.buf)
        pos = 0
        last = (0, 0, 0)
        for _ in range(args.key.nr_items):
            header = SearchHeader.from_buffer_copy(raw, pos)
            data = raw[pos + header_size : pos + header_size + header.len]
            pos += header_size + header.len
            last = (int(header.objectid), int(header.type), int(header.offset))
            if types is None or header.type in types:
                yield Item(last[0], last[1], last[2], int(header.transid), data)

        nxt = _next_key(last)
        if nxt is None or nxt > tuple(max_key):
            return
        key = list(nxt)


def _next_key(key: tuple[int, int, int]) -> tuple[int, int, int] | None:
    objectid, type_, offset = key
    if offset < U64_MAX:
        return objectid, type_, offset + 1
    if type_ < 255:
        return objectid, type_ + 1, 0
    if objectid < U64_MAX:
        return objectid + 1, 0, 0
    return None


@dataclasses.dataclass(frozen=True)
class RootRef:
    """A ``ROOT_REF`` item: subvolume ``child_id`` hangs in directory ``dirid`` of its parent
    under ``name``."""

    child_id: int
    dirid: int
    name: str


_ROOT_REF = struct.Struct("<QQH")  # struct btrfs_root_ref: dirid, sequence, name_len (packed)


def child_subvolumes(fd: int, subvol_id: int) -> list[RootRef]:
    """The subvolumes directly inside subvolume ``subvol_id``, from the root tree's ROOT_REFs.

    Key (parent id, ROOT_REF, child id); the payload is ``struct btrfs_root_ref`` followed by
    the entry name. The driver deletes these (depth first) before deleting a layer, which
    finds nested subvolumes without walking the layer's files.
    """
    refs = []
    for item in tree_search(
        fd,
        BTRFS_ROOT_TREE_OBJECTID,
        min_key=(subvol_id, BTRFS_ROOT_REF_KEY, 0),
        max_key=(subvol_id, BTRFS_ROOT_REF_KEY, U64_MAX),
        types=frozenset({BTRFS_ROOT_REF_KEY}),
    ):
        dirid, _sequence, name_len = _ROOT_REF.unpack_from(item.data)
        name = item.data[_ROOT_REF.size : _ROOT_REF.size + name_len]
        refs.append(RootRef(child_id=item.offset, dirid=dirid, name=os.fsdecode(name)))
    return refs


def subvolume_exists(fd: int, subvol_id: int) -> bool:
    """True while the root tree still has a ROOT_ITEM for ``subvol_id``.

    A deleted subvolume keeps its root item until the cleaner has dropped all its blocks; only
    then can its qgroup be deleted.
    """
    for _ in tree_search(
        fd,
        BTRFS_ROOT_TREE_OBJECTID,
        min_key=(subvol_id, BTRFS_ROOT_ITEM_KEY, 0),
        max_key=(subvol_id, BTRFS_ROOT_ITEM_KEY, U64_MAX),
        types=frozenset({BTRFS_ROOT_ITEM_KEY}),
    ):
        return True
    return False


# ----------------------------------------------------------------- quotas


_QGROUP_STATUS = struct.Struct("<QQQ")  # btrfs_qgroup_status_item: version, generation, flags


def quota_status(fd: int) -> int | None:
    """The ``flags`` of the quota tree's QGROUP_STATUS item, or None when quotas are off.

    ``struct btrfs_qgroup_status_item`` is version, generation, flags, rescan progress. Of the
    flags, ``BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT`` means the counters are not to be trusted
    (btrfs stops accounting, and so enforcing limits, after e.g. deleting a big subvolume)
    until a rescan completes. The item is written at transaction commit: sync first for news.
    Without quotas there is no quota tree, and the search fails with ``ENOENT``.
    """
    try:
        for item in tree_search(
            fd,
            BTRFS_QUOTA_TREE_OBJECTID,
            min_key=(0, BTRFS_QGROUP_STATUS_KEY, 0),
            max_key=(0, BTRFS_QGROUP_STATUS_KEY, U64_MAX),
            types=frozenset({BTRFS_QGROUP_STATUS_KEY}),
        ):
            _version, _generation, flags = _QGROUP_STATUS.unpack_from(item.data)
            return int(flags)
    except FileNotFoundError:
        return None
    return None


def quota_enabled(fd: int) -> bool:
    """True if the filesystem has quotas on (the quota tree holds its QGROUP_STATUS item)."""
    return quota_status(fd) is not None


def quota_enable(fd: int) -> None:
    """BTRFS_IOC_QUOTA_CTL with ``cmd = BTRFS_QUOTA_CTL_ENABLE``: turn on qgroup accounting.

    The kernel creates the quota tree and a qgroup per existing subvolume and starts a rescan
    that counts what they already hold; wait for it with :func:`quota_rescan_wait`. Enabling
    twice is harmless. The driver does it the first time a layer asks for a size limit, since
    accounting slows down snapshots and deletes on a filesystem with many of them.
    """
    _call(fd, BTRFS_IOC_QUOTA_CTL, QuotaCtlArgs(cmd=BTRFS_QUOTA_CTL_ENABLE))


def quota_rescan(fd: int) -> None:
    """BTRFS_IOC_QUOTA_RESCAN: recount every qgroup from scratch (``EINPROGRESS`` if running)."""
    try:
        _call(fd, BTRFS_IOC_QUOTA_RESCAN, QuotaRescanArgs())
    except OSError as exc:
        if exc.errno != errno.EINPROGRESS:
            raise


def quota_rescan_wait(fd: int) -> None:
    """BTRFS_IOC_QUOTA_RESCAN_WAIT: block until a running rescan is done (at once if none)."""
    _call(fd, BTRFS_IOC_QUOTA_RESCAN_WAIT)


def qgroupid(level: int, subvol_id: int) -> int:
    """The 64-bit qgroup id ``level/id`` (a subvolume's own qgroup is level 0)."""
    return (level << 48) | subvol_id


def qgroup_limit(fd: int, qgroup: int, *, max_rfer: int | None) -> None:
    """BTRFS_IOC_QGROUP_LIMIT: limit the bytes qgroup ``qgroup`` may reference.

    ``lim.flags`` says which fields count; with ``BTRFS_QGROUP_LIMIT_MAX_RFER`` a write that
    would take the qgroup's referenced bytes past ``max_rfer`` fails with ``EDQUOT``.
    ``max_rfer=None`` removes the limit. Note that a snapshot references its parent's data,
    so the limit covers the layer's whole content, not only what it adds.
    """
    lim = QgroupLimit(flags=BTRFS_QGROUP_LIMIT_MAX_RFER, max_rfer=max_rfer or 0)
    if max_rfer is None:
        lim.max_rfer = U64_MAX  # "no limit", as btrfs-progs sets it
    _call(fd, BTRFS_IOC_QGROUP_LIMIT, QgroupLimitArgs(qgroupid=qgroup, lim=lim))


def qgroup_destroy(fd: int, qgroup: int) -> None:
    """BTRFS_IOC_QGROUP_CREATE with ``create = 0``: delete qgroup ``qgroup``.

    ``EBUSY`` while its subvolume still exists (also while a deleted one awaits the cleaner),
    ``ENOENT`` if there is no such qgroup (recent kernels delete a level-0 qgroup themselves
    once its subvolume is dropped).
    """
    _call(fd, BTRFS_IOC_QGROUP_CREATE, QgroupCreateArgs(create=0, qgroupid=qgroup))


@dataclasses.dataclass(frozen=True)
class QgroupUsage:
    """A qgroup's INFO item (bytes referenced and exclusive) and LIMIT item."""

    qgroup: int
    referenced: int
    exclusive: int
    max_referenced: int | None


_QGROUP_INFO = struct.Struct("<QQQQQ")  # generation, rfer, rfer_cmpr, excl, excl_cmpr
_QGROUP_LIMIT = struct.Struct("<QQQQQ")  # flags, max_rfer, max_excl, rsv_rfer, rsv_excl


def qgroup_usage(fd: int, qgroup: int) -> QgroupUsage | None:
    """Read qgroup ``qgroup``'s INFO and LIMIT items from the quota tree (None if absent)."""
    info: tuple[int, ...] | None = None
    max_rfer: int | None = None
    for item in tree_search(
        fd,
        BTRFS_QUOTA_TREE_OBJECTID,
        min_key=(0, BTRFS_QGROUP_INFO_KEY, qgroup),
        max_key=(0, BTRFS_QGROUP_LIMIT_KEY, qgroup),
        types=frozenset({BTRFS_QGROUP_INFO_KEY, BTRFS_QGROUP_LIMIT_KEY}),
    ):
        if item.offset != qgroup:
            continue
        if item.type == BTRFS_QGROUP_INFO_KEY:
            info = _QGROUP_INFO.unpack_from(item.data)
        else:
            flags, rfer_limit, *_ = _QGROUP_LIMIT.unpack_from(item.data)
            if flags & BTRFS_QGROUP_LIMIT_MAX_RFER and rfer_limit != U64_MAX:
                max_rfer = rfer_limit
    if info is None:
        return None
    return QgroupUsage(qgroup, referenced=info[1], exclusive=info[3], max_referenced=max_rfer)


# ----------------------------------------------------------------- filesystem identity


class _StatFs(ctypes.Structure):
    """The head of ``struct statfs`` on 64-bit Linux; only ``f_type`` is read, the rest is room
    for the kernel to write into."""

    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 512)]


_libc = ctypes.CDLL(None, use_errno=True)


def statfs_type(path: os.PathLike[str] | str) -> int:
    """``statfs(2)``'s ``f_type``: the filesystem's magic number (btrfs: 0x9123683E)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return int(buf.f_type) & 0xFFFFFFFF


def is_subvolume_root(path: os.PathLike[str] | str) -> bool:
    """True if ``path`` is the root directory of a btrfs subvolume (inode 256 on btrfs)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_ino == BTRFS_FIRST_FREE_OBJECTID
        and statfs_type(path) == BTRFS_SUPER_MAGIC
    )


def open_dir(path: os.PathLike[str] | str) -> int:
    """An ``O_RDONLY | O_DIRECTORY`` fd of ``path``, what every ioctl here is sent to."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
