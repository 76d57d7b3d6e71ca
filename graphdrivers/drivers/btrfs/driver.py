"""The btrfs driver: every layer is a btrfs subvolume, and a child is a snapshot of its parent.

A layer without a parent is a new empty subvolume; a child is a writable snapshot of its
parent's subvolume, made in O(1) whatever the parent holds: the two trees share every block
until one side writes. ``get`` returns the subvolume's directory itself (there is nothing to
mount). All kernel work goes through the ioctls of :mod:`.ioctl`; the driver never runs the
``btrfs`` program.

On-disk layout (the store's part is drawn in :mod:`graphdrivers.store`)::

    HOME/                          0710, must be on btrfs  (store: lock, layers/, staging/)
    ├── stale-qgroups.json         QGROUPS_FILE: ids of deleted subvolumes whose qgroups btrfs
    │                              would not delete yet (see Quotas); absent when none
    └── subvolumes/                SUBVOLUMES_DIR, 0700, a plain directory
        ├── <base id>/             a subvolume (empty when made: 0755 root:root), read-only
        │   └── ...                while it has children (BTRFS_SUBVOL_RDONLY)
        └── <child id>/            a snapshot of <base id>: writable, own tree id and qgroup
            └── ...                a nested subvolume made inside a layer lives in its tree

Read-only parents. A layer that has children is flagged read-only (``BTRFS_SUBVOL_RDONLY``)
before its first child is snapshotted, and made writable again when its last child is removed
(option ``btrfs.readonly_parents=false`` turns this off). A snapshot copies a parent as it is at
that moment and is never told of later changes, so a parent written after a child was made
would silently no longer be what the child's diff is against: ``diff(child, parent)`` would
report the parent's later edits reversed. The flag makes such a write fail (``EROFS``) instead.
It costs nothing: btrfs snapshots and deletes read-only subvolumes as it does writable ones.

Quotas. ``storage_opt={"size": "100M"}`` turns btrfs quotas on (once per filesystem, with a
rescan) and sets a limit on the referenced bytes of the layer's level-0 qgroup: a write that
would pass it fails with ``EDQUOT``. A snapshot references its parent's data, so the limit
covers the layer's whole content, not only what it adds. Before the layer's subvolume is
deleted its limit is cleared; after, its qgroup is deleted, which btrfs allows only once its
cleaner thread has dropped the subvolume: until then the id waits in ``stale-qgroups.json`` and
is retried at the next remove and at ``cleanup``.

Crash safety. The store's record says ``creating`` before the subvolume is made and ``removing``
before it is deleted; after either step the driver commits the btrfs transaction
(``BTRFS_IOC_SYNC``) before the record moves on, so a record never outlives or precedes its
subvolume on disk. A driver opened after a crash deletes the subvolume of an unfinished layer
and sets every layer's read-only flag to what its children say.

Diff side. ``changes`` and ``diff`` of a layer against the parent it was snapshotted from find
the changed inodes from btrfs generation numbers (:mod:`.findnew`) instead of walking both
trees; option ``btrfs.diff=naive`` forces the generic walk. Both give the same list.

Limitations:

- ``get(readonly=True)`` returns the same directory as a writable get: there is no mount to
  make read-only (a layer with children is read-only anyway).
- A nested subvolume inside a layer is not part of a child's snapshot: the child shows an empty
  directory in its place (btrfs semantics). Nested subvolumes are deleted with their layer.
- A deleted subvolume's qgroup outlives its layer until btrfs's cleaner has dropped the
  subvolume and the driver's next remove or cleanup deletes it (without a limit meanwhile).
- Quota accounting slows down snapshot creation and deletion on big filesystems; it is turned
  on only when a layer asks for a size.
- btrfs stops accounting, and so enforcing limits, when it marks quotas inconsistent (after it
  drops a big subvolume, for one): the driver starts a rescan after such a remove and waits for
  it before setting a limit, but between the two, limits set earlier are not enforced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

from graphdrivers import hostcheck
from graphdrivers.driver import Capabilities, Change, Driver
from graphdrivers.drivers.btrfs import ioctl
from graphdrivers.errors import InvalidOption, LayerNotFound, NotSupported
from graphdrivers.fsutil.fstype import filesystem_type
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.ids import LayerId
from graphdrivers.store import LayerRecord, LayerState, atomic_write, make_private_dir

log = logging.getLogger(__name__)

SUBVOLUMES_DIR = "subvolumes"
QGROUPS_FILE = "stale-qgroups.json"
EMPTY_ROOT_MODE = 0o755
OPT_DIFF = "btrfs.diff"
OPT_READONLY_PARENTS = "btrfs.readonly_parents"
DIFF_MODES = ("generation", "naive")
SIZE_OPT = "size"
_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str, layer_id: str) -> int:
    """``"100M"`` -> bytes (suffixes k, m, g, t; powers of 1024)."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    number, suffix = (value[:-1], value[-1]) if value and value[-1] in "kmgt" else (value, "")
    try:
        size = int(float(number) * _SIZE_SUFFIXES[suffix])
    except ValueError as exc:
        raise InvalidOption(
            f"storage option size={text!r} is not a size (like 512M or 10G)", layer_id=layer_id
        ) from exc
    if size <= 0:
        raise InvalidOption(f"storage option size={text!r} must be positive", layer_id=layer_id)
    return size


@contextlib.contextmanager
def opened(path: Path) -> Iterator[int]:
    """A directory fd of ``path`` for the ioctls, closed after the block."""
    fd = ioctl.open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


class BtrfsDriver(Driver):
    """Layers as btrfs subvolumes under ``HOME/subvolumes`` (see the module docstring)."""

    name = "btrfs"
    known_options: ClassVar[frozenset[str]] = frozenset({OPT_DIFF, OPT_READONLY_PARENTS})
    known_storage_opts = frozenset({SIZE_OPT})

    # ----------------------------------------------------------------- set-up

    def _check_host(self) -> None:
        for check in (hostcheck.privilege_sys_admin(), hostcheck.kernel_filesystem("btrfs")):
            if not check.ok:
                raise NotSupported(check.what, hint=check.hint, driver=self.name)
        where = hostcheck.existing_ancestor(self.home)
        if ioctl.statfs_type(where) != ioctl.BTRFS_SUPER_MAGIC:
            raise NotSupported(
                f"backing filesystem btrfs at {self.home}",
                hint=f"{where} is on {filesystem_type(where)}; " + hostcheck.BTRFS_HOME_HINT,
                driver=self.name,
            )
        self.diff_mode = self.options.get(OPT_DIFF, DIFF_MODES[0])
        if self.diff_mode not in DIFF_MODES:
            raise InvalidOption(f"{OPT_DIFF}={self.diff_mode!r}: use one of {DIFF_MODES}")
        flag = self.options.get(OPT_READONLY_PARENTS, "true").lower()
        if flag not in ("true", "false"):
            raise InvalidOption(f"{OPT_READONLY_PARENTS}={flag!r}: use true or false")
        self.readonly_parents = flag == "true"

    def _init_home(self) -> None:
        self.subvolumes_dir = self.home / SUBVOLUMES_DIR
        make_private_dir(self.subvolumes_dir)

    def layer_path(self, layer_id: str) -> Path:
        """The layer's subvolume (whether or not it exists)."""
        return self.subvolumes_dir / layer_id

    def __enter__(self) -> BtrfsDriver:
        return self

    def _check_storage_opt(
        self, layer_id: LayerId, rw: bool, storage_opt: Mapping[str, str] | None
    ) -> dict[str, str]:
        opts = super()._check_storage_opt(layer_id, rw, storage_opt)
        if SIZE_OPT in opts:
            parse_size(opts[SIZE_OPT], layer_id)
        return opts

    # ----------------------------------------------------------------- create and remove

    def _create_layer(self, record: LayerRecord) -> None:
        with opened(self.subvolumes_dir) as dir_fd:
            if record.parent is None:
                ioctl.subvolume_create(dir_fd, record.id)
                self._init_empty_root(self.layer_path(record.id))
            else:
                if self.readonly_parents:
                    self._set_readonly(record.parent, True)
                with opened(self.layer_path(record.parent)) as parent_fd:
                    ioctl.snapshot_create(parent_fd, dir_fd, record.id)
            if SIZE_OPT in record.storage_opt:
                self._set_limit(record.id, parse_size(record.storage_opt[SIZE_OPT], record.id))
            ioctl.sync(dir_fd)

    @staticmethod
    def _init_empty_root(path: Path) -> None:
        """A new subvolume's root follows the umask and the caller: make it 0755 root:root."""
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        os.chmod(path, EMPTY_ROOT_MODE)

    def _remove_layer(self, layer_id: LayerId) -> None:
        path = self.layer_path(layer_id)
        record = self.store.get(layer_id)
        deleted: list[int] = []
        if ioctl.is_subvolume_root(path):
            self._destroy_subvolume(self.subvolumes_dir, layer_id, deleted)
        else:
            remove_tree(path)  # Limitation: only a plain directory if a crash left one
        with opened(self.subvolumes_dir) as dir_fd:
            ioctl.sync(dir_fd)
            if deleted:
                self._rescan_if_inconsistent(dir_fd, wait=False)
        self._forget_qgroups(deleted)
        if record is not None and record.parent is not None:
            self._settle_readonly(record.parent, leaving=layer_id)

    def _destroy_subvolume(self, where: Path, name: str, deleted: list[int]) -> None:
        """Delete subvolume ``where/name``, its nested subvolumes first, and clear its limit;
        append the ids whose qgroups are to be deleted to ``deleted``."""
        path = where / name
        with opened(path) as fd:
            subvol = ioctl.subvolume_id(fd)
            ioctl.set_readonly(fd, False)  # nested ones cannot be unlinked from a read-only tree
            for ref in ioctl.child_subvolumes(fd, subvol):
                _, rel = ioctl.ino_lookup(fd, subvol, ref.dirid)
                log.debug("deleting nested subvolume %s%s in %s", rel, ref.name, path)
                self._destroy_subvolume(path / rel, ref.name, deleted)
            quota = ioctl.quota_enabled(fd)
            if quota:
                ioctl.qgroup_limit(fd, ioctl.qgroupid(0, subvol), max_rfer=None)
        with opened(where) as dir_fd:
            ioctl.subvolume_destroy(dir_fd, name)
        if quota:
            deleted.append(subvol)

    def _forget_qgroups(self, subvols: list[int]) -> None:
        """Delete the qgroups of deleted subvolumes. btrfs refuses (EBUSY) until its cleaner has
        dropped the subvolume; those ids wait in QGROUPS_FILE for the next remove or cleanup."""
        pending_file = self.home / QGROUPS_FILE
        pending = set(subvols)
        with contextlib.suppress(FileNotFoundError):
            pending.update(json.loads(pending_file.read_text()))
        if not pending:
            return
        left = []
        with opened(self.subvolumes_dir) as fd:
            for subvol in sorted(pending):
                try:
                    ioctl.qgroup_destroy(fd, ioctl.qgroupid(0, subvol))
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        left.append(subvol)
                    elif exc.errno != errno.ENOENT:
                        raise
        if left:
            log.debug("qgroups of subvolumes %s wait for btrfs's cleaner", left)
            atomic_write(pending_file, json.dumps(left).encode())
        else:
            pending_file.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        with self.store.lock():
            self._forget_qgroups([])

    # ----------------------------------------------------------------- read-only parents

    def _set_readonly(self, layer_id: LayerId, readonly: bool) -> None:
        with opened(self.layer_path(layer_id)) as fd:
            ioctl.set_readonly(fd, readonly)

    def _settle_readonly(self, layer_id: LayerId, leaving: LayerId | None = None) -> None:
        """Make ``layer_id`` read-only iff it has children (other than ``leaving``)."""
        if not ioctl.is_subvolume_root(self.layer_path(layer_id)):
            return
        children = [c for c in self.store.children(layer_id) if c != leaving]
        self._set_readonly(layer_id, self.readonly_parents and bool(children))

    def _recover(self) -> None:
        super()._recover()
        for record in self.store.records():
            if record.state is LayerState.READY:
                self._settle_readonly(record.id)

    # ----------------------------------------------------------------- quota

    def _set_limit(self, layer_id: LayerId, size: int) -> None:
        with opened(self.layer_path(layer_id)) as fd:
            if not ioctl.quota_enabled(fd):
                log.info("enabling btrfs quotas on the filesystem of %s", self.home)
                ioctl.quota_enable(fd)
            self._rescan_if_inconsistent(fd, wait=True)
            ioctl.qgroup_limit(fd, ioctl.qgroupid(0, ioctl.subvolume_id(fd)), max_rfer=size)

    @staticmethod
    def _rescan_if_inconsistent(fd: int, *, wait: bool) -> None:
        """btrfs stops accounting (and so enforcing limits) when it cannot account a change
        cheaply, e.g. the drop of a big subvolume, and marks quotas inconsistent until a
        rescan: start one (and with ``wait``, wait for it, and for one already running)."""
        ioctl.sync(fd)
        status = ioctl.quota_status(fd) or 0
        if status & ioctl.BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT:
            log.info("btrfs quotas are inconsistent; rescanning")
            ioctl.quota_rescan(fd)
        if wait:
            ioctl.quota_rescan_wait(fd)

    def usage(self, layer_id: str) -> ioctl.QgroupUsage | None:
        """The layer's qgroup counters and limit (None while quotas are off)."""
        record = self.store.require(LayerId(layer_id))
        with opened(self.layer_path(record.id)) as fd:
            if not ioctl.quota_enabled(fd):
                return None
            return ioctl.qgroup_usage(fd, ioctl.qgroupid(0, ioctl.subvolume_id(fd)))

    # ----------------------------------------------------------------- mounting

    def _mount(self, record: LayerRecord, readonly: bool) -> Path:
        # Limitation: readonly is not enforced; the caller gets the subvolume itself.
        path = self.layer_path(record.id)
        if not ioctl.is_subvolume_root(path):
            raise LayerNotFound(record.id, hint=f"its subvolume {path} is missing from the home")
        return path

    # ----------------------------------------------------------------- the diff side

    def _naive_changes(self, root: Path, parent_root: Path | None) -> list[Change]:
        """Changes between two mountpoints, which on btrfs are the subvolumes themselves."""
        if self.diff_mode == "generation" and parent_root is not None:
            from graphdrivers.drivers.btrfs.findnew import changes_since_snapshot

            found = changes_since_snapshot(root, parent_root)
            if found is not None:
                return found
        return super()._naive_changes(root, parent_root)

    # ----------------------------------------------------------------- reporting

    def _metadata(self, record: LayerRecord) -> dict[str, str]:
        path = self.layer_path(record.id)
        with opened(path) as fd:
            info = ioctl.subvolume_info(fd)
            readonly = ioctl.is_readonly(fd)
        meta = {
            "Path": str(path),
            "SubvolumeId": str(info.id),
            "ReadOnly": str(readonly).lower(),
            "CreatedTransaction": str(info.otransid),
        }
        if SIZE_OPT in record.storage_opt:
            meta["SizeLimit"] = str(parse_size(record.storage_opt[SIZE_OPT], record.id))
        return meta

    def _status_extra(self) -> dict[str, str]:
        with opened(self.subvolumes_dir) as fd:
            quota = ioctl.quota_enabled(fd)
        return {
            "subvolumes_dir": str(self.subvolumes_dir),
            "quota": "enabled" if quota else "disabled",
            "diff": self.diff_mode,
            "readonly_parents": str(self.readonly_parents).lower(),
        }

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_diff=self.diff_mode == "generation",
            reproducible_diff=True,
            quota=True,
            supports_devices=True,
        )


def conformance_home() -> contextlib.AbstractContextManager[Path]:
    """Where ``graphdrivers conformance btrfs`` and ``compare`` put homes: a loopback btrfs."""
    from graphdrivers.drivers.btrfs.loopback import loopback_btrfs

    return loopback_btrfs()
