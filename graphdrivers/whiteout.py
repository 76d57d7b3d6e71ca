"""Whiteouts and opaque directories: the names and attributes both formats use.

A *whiteout* hides a name of a lower layer; an *opaque* directory hides every lower entry below
it. Two on-disk formats exist:

- **aufs** (also the OCI layer tar format): an empty regular file ``.wh.<name>`` beside the hidden
  name, and a file ``.wh..wh..opq`` inside an opaque directory. Names starting with ``.wh..wh.``
  are aufs metadata (``.wh..wh.plnk``, ``.wh..wh.aufs``), never content.
- **overlay** (kernel overlayfs, fuse-overlayfs): a character device 0/0 named ``<name>``, and the
  xattr ``trusted.overlay.opaque`` (``user.overlay.opaque`` without privilege) set to ``y`` on an
  opaque directory.

``.wh.``, ``.wh..`` and ``.wh...`` would hide the directory itself or its parent and are invalid
everywhere.
"""

from __future__ import annotations

import enum
import os
import stat

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_OPAQUE_XATTR_USER = "user.overlay.opaque"
OVERLAY_OPAQUE_XATTRS = (OVERLAY_OPAQUE_XATTR, OVERLAY_OPAQUE_XATTR_USER)
OPAQUE_VALUE = b"y"
INVALID_WHITEOUT_NAMES = frozenset({".wh.", ".wh..", ".wh..."})


class WhiteoutFormat(enum.StrEnum):
    """How a layer's directory stores deletions (see the module docstring)."""

    AUFS = "aufs"
    OVERLAY = "overlay"


def is_whiteout_name(name: str) -> bool:
    """True for ``.wh.<name>`` entries that hide a lower name (not metadata, not opaque)."""
    return name.startswith(WHITEOUT_PREFIX) and not name.startswith(WHITEOUT_META_PREFIX)


def whited_out_name(name: str) -> str:
    """``.wh.foo`` -> ``foo``."""
    return name[len(WHITEOUT_PREFIX) :]


def whiteout_name(name: str) -> str:
    """``foo`` -> ``.wh.foo``."""
    return WHITEOUT_PREFIX + name


def is_overlay_whiteout(st: os.stat_result) -> bool:
    """True for an overlay whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
