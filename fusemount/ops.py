"""The union filesystem's pyfuse3 Operations: the handler groups put together and guarded."""

from __future__ import annotations

from fusemount.guard import guarded
from fusemount.ops_dir import DirOps
from fusemount.ops_read import ReadOps
from fusemount.ops_write import WriteOps


@guarded
class UnionOperations(ReadOps, WriteOps, DirOps):
    """Serves a :class:`fusemount.tree.UnionTree`; every handler is wrapped by ``guarded``."""
