"""The OCI layer tar format: what changed, writing it as a diff, and applying one safely.

- :func:`changes_dirs` and :func:`changes_size`: the changes of a tree against its parent's
  tree, with moby's rules (:mod:`graphdrivers.archive.changes`).
- :func:`export_changes` and :func:`export_tree`: a deterministic, uncompressed PAX layer tar of
  those changes or of a whole tree (:mod:`graphdrivers.archive.export`).
- :func:`apply_layer` with :class:`ApplyOptions`: unpack a plain, gzip or zstd layer tar into a
  tree, never touching anything outside it (:mod:`graphdrivers.archive.apply`, resolving names
  through :mod:`graphdrivers.archive.confine`).
- :func:`open_layer_stream`: the uncompressed bytes of a possibly compressed layer.

docs/layer-format.md describes the format and every rule in user terms.
"""

from graphdrivers.archive.apply import ApplyOptions, apply_layer
from graphdrivers.archive.changes import changes_dirs, changes_size
from graphdrivers.archive.compression import open_layer_stream
from graphdrivers.archive.export import export_changes, export_tree

__all__ = [
    "ApplyOptions",
    "apply_layer",
    "changes_dirs",
    "changes_size",
    "export_changes",
    "export_tree",
    "open_layer_stream",
]
