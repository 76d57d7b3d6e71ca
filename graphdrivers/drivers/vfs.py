"""The vfs driver: every layer is a full, independent copy of its parent's tree.

The simplest graph driver there is, and the one that runs anywhere: no mounts, no kernel
features, no special filesystem. A child layer starts as an exact copy of its parent
(:func:`graphdrivers.fsutil.copy.copy_tree`: reflinks where the filesystem has them, so on btrfs
or xfs a copy shares its data extents until written), after which parent and child have nothing
in common. ``get`` just returns the directory. The diff side is the generic naive one of
:class:`~graphdrivers.driver.Driver`: it compares the layer's tree with its parent's.

On-disk layout (the store's part is drawn in :mod:`graphdrivers.store`)::

    HOME/                         0710  (store: lock, layers/<id>.json, staging/)
    ├── dir/                      0710  LAYERS_DIR: nobody untrusted traverses into a layer
    │   └── <id>/                 the layer's tree root itself; owner and mode are the tree's
    │       └── ...               (an empty layer: 0755 root:root)
    └── staging/                  STAGING (the store's): where a layer is built or torn down
        ├── <id>.create/          a layer being copied; renamed to dir/<id> when complete
        └── <id>.remove/          a removed layer being deleted

Why staging. A create copies into ``staging/<id>.create`` and renames it to ``dir/<id>`` only
when the copy is complete, so a process killed mid-copy leaves nothing under ``dir/``: the layer's
``creating`` record makes the next driver opened on the home roll it back, and the store empties
``staging/`` at start-up. A remove first renames ``dir/<id>`` into staging, so the layer vanishes
at once even if deleting its files takes long or is interrupted.

Limitations:

- Disk: every layer is a full copy of its tree (on a filesystem without reflinks), so N layers of
  a 1 GiB rootfs take N GiB; ``create`` takes time proportional to the parent's size.
- ``get(readonly=True)`` returns the same writable directory: vfs has no mount to make read-only.
- Quota (``size`` storage option) is not supported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from graphdrivers.driver import Capabilities, Driver
from graphdrivers.errors import LayerNotFound
from graphdrivers.fsutil.copy import CopyMethod, copy_tree, probe_copy_method
from graphdrivers.fsutil.remove import remove_tree
from graphdrivers.ids import LayerId
from graphdrivers.store import HOME_MODE, LayerRecord, fsync_dir, make_private_dir

log = logging.getLogger(__name__)

LAYERS_DIR = "dir"
LAYERS_DIR_MODE = HOME_MODE
CREATE_SUFFIX = ".create"
REMOVE_SUFFIX = ".remove"
EMPTY_ROOT_MODE = 0o755


class VfsDriver(Driver):
    """Layers as full directory copies under ``HOME/dir/<id>`` (see the module docstring)."""

    name = "vfs"

    def _init_home(self) -> None:
        self.layers_dir = self.home / LAYERS_DIR
        make_private_dir(self.layers_dir, LAYERS_DIR_MODE)
        self.copy_method: CopyMethod = probe_copy_method(self.store.staging_dir)
        self.last_copy_method: CopyMethod | None = None
        log.debug("vfs home %s copies data by %s", self.home, self.copy_method)

    def layer_path(self, layer_id: LayerId) -> Path:
        """Where the tree of ``layer_id`` lives (whether or not it exists)."""
        return self.layers_dir / layer_id

    def _staging(self, layer_id: LayerId, suffix: str) -> Path:
        return self.store.staging_dir / f"{layer_id}{suffix}"

    # ----------------------------------------------------------------- storage hooks

    def _create_layer(self, record: LayerRecord) -> None:
        staging = self._staging(record.id, CREATE_SUFFIX)
        remove_tree(staging)  # a leftover of an earlier failed attempt

        try:
            if record.parent is None:
                self._make_empty_root(staging)
            else:
                stats = copy_tree(self.layer_path(record.parent), staging)
                self.last_copy_method = stats.method
                log.debug(
                    "layer %s: copied %d files, %d bytes from %s by %s",
                    record.id,
                    stats.files,
                    stats.bytes,
                    record.parent,
                    stats.method,
                )
            os.rename(staging, self.layer_path(record.id))
        except BaseException:
            remove_tree(staging)
            raise
        fsync_dir(self.layers_dir)

    @staticmethod
    def _make_empty_root(path: Path) -> None:
        """An empty layer's root: 0755, owned by root:root when we are root."""
        os.mkdir(path, EMPTY_ROOT_MODE)
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        # Limitation: not running as root, the root belongs to the calling user, not 0:0.
        os.chmod(path, EMPTY_ROOT_MODE)  # the umask may have cut bits from mkdir's mode

    def _remove_layer(self, layer_id: LayerId) -> None:
        remove_tree(self._staging(layer_id, CREATE_SUFFIX))
        doomed = self._staging(layer_id, REMOVE_SUFFIX)
        remove_tree(doomed)
        try:
            os.rename(self.layer_path(layer_id), doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.layers_dir)
        remove_tree(doomed)

    def _mount(self, record: LayerRecord, readonly: bool) -> Path:
        # Limitation: readonly is not enforced; the caller gets the layer's writable tree.
        path = self.layer_path(record.id)
        if not path.is_dir():
            raise LayerNotFound(record.id, hint=f"its tree {path} is missing from the home")
        return path

    def _metadata(self, record: LayerRecord) -> dict[str, str]:
        return {"SourceDir": str(self.layer_path(record.id))}

    def _status_extra(self) -> dict[str, str]:
        extra = {"copy_method": self.copy_method.value, "layers_dir": str(self.layers_dir)}
        if self.last_copy_method is not None:
            extra["last_copy_method"] = self.last_copy_method.value
        return extra

    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_diff=False, reproducible_diff=True, quota=False, supports_devices=True
        )
