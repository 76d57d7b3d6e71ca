"""Removing layer trees that may hold read-only directories and files."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it; a missing path is not an error.

    Symlinks are removed, never followed. A directory whose mode denies writing (a layer can hold
    0555 directories) is made writable first, which works for root and for the owner.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return

    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return

    def make_writable_and_retry(func, failed_path, _exc_info):  # type: ignore[no-untyped-def]
        # Python 3.11's rmtree has only onerror; it hands us the failing call to retry.
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            func(failed_path)
        except FileNotFoundError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)
