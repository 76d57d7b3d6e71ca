"""The command line, compatible with fuse-overlayfs and with ``mount -t fuse.fusemount``.

Forms::

    fusemount -o lowerdir=A:B:C,upperdir=U,workdir=W MOUNTPOINT
    fusemount SOURCE MOUNTPOINT -o lowerdir=...          (what mount.fuse3 runs)

``lowerdir`` lists the lowers top first (``A`` is directly under the upper); ``:`` inside a
path is written ``\\:``. Without ``upperdir`` the mount is read-only. Further options:

=====================  =========================================================================
``whiteout=``          ``overlay`` (default: char device 0/0, opaque xattr) or ``aufs``
                       (``.wh.`` files); the format *written*; both are always read
``xattr_namespace=``   ``trusted`` (default) or ``user``: where the opaque xattr is written
``fsname=``            the source name shown in mount tables (default ``fusemount``)
``allow_other``        let other users use the mount
``debug``              log every request (to ``log=`` or stderr in the foreground)
``log=PATH``           append the daemon's log to PATH (it detaches from the terminal)
``pidfile=PATH``       write the daemon's pid there once the mount is live
``timeout=S``          entry/attr timeout for entries of the upper (default 1 s)
``auto_unmount``       libfuse's auto_unmount through a fusermount3 helper; off by default: it
                       adds about 1 s to every mount, and on the test machines the helper often
                       exits without unmounting (clean up with ``fusermount3 -u -z``)
``ro``                 read-only even with an upper
=====================  =========================================================================

Generic mount flags (``rw``, ``dev``, ``suid``, ``exec``, ``noatime``, ``defaults``...) are
accepted and ignored; anything else is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from graphdrivers.errors import InvalidOption
from graphdrivers.whiteout import OVERLAY_OPAQUE_XATTR, OVERLAY_OPAQUE_XATTR_USER, WhiteoutFormat

IGNORED_FLAGS = frozenset(
    {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
     "strictatime", "nodiratime", "diratime", "defaults", "auto", "noauto", "user", "nouser",
     "nofail", "_netdev", "async", "sync", "default_permissions"}
)  # fmt: skip


@dataclasses.dataclass
class MountOptions:
    mountpoint: str
    lowerdirs: list[str]
    upperdir: str | None = None
    workdir: str | None = None
    whiteout: WhiteoutFormat = WhiteoutFormat.OVERLAY
    opaque_xattr: str = OVERLAY_OPAQUE_XATTR
    fsname: str = "fusemount"
    allow_other: bool = False
    debug: bool = False
    log: str | None = None
    pidfile: str | None = None
    upper_timeout: float = 1.0
    auto_unmount: bool = False
    readonly: bool = False
    foreground: bool = False

    @property
    def writable(self) -> bool:
        return self.upperdir is not None and not self.readonly


def split_lowerdir(value: str) -> list[str]:
    """``A:B\\:C`` -> ``["A", "B:C"]``."""
    parts, current, escaped = [], [], False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [part for part in parts if part]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusemount", description="Union filesystem (overlay/aufs layers) over FUSE."
    )
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    parser.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    parser.add_argument("-d", "--debug", action="store_true", help="log every request")
    return parser


def parse(argv: list[str]) -> MountOptions:
    """Parse a command line; raises :class:`InvalidOption` with a one-line reason."""
    args = _parser().parse_args(argv)
    if len(args.paths) > 2:
        raise InvalidOption(f"expected [SOURCE] MOUNTPOINT, got {len(args.paths)} paths")
    values: dict[str, str | None] = {}
    for chunk in args.options:
        for item in _split_options(chunk):
            key, sep, value = item.partition("=")
            values[key] = value if sep else None
    lower = values.pop("lowerdir", None)
    if not lower:
        raise InvalidOption("lowerdir= is required")
    opts = MountOptions(
        mountpoint=os.path.abspath(args.paths[-1]),
        lowerdirs=[os.path.abspath(p) for p in split_lowerdir(lower)],
        foreground=args.foreground,
        debug=args.debug,
    )
    _apply(opts, values)
    if opts.upperdir and not opts.workdir:
        raise InvalidOption("upperdir= needs workdir=")
    return opts


def _split_options(chunk: str) -> list[str]:
    # Commas separate options; a backslash escapes a comma inside a path.
    items, current, escaped = [], [], False
    for ch in chunk:
        if escaped:
            current.append(ch if ch == "," else "\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item for item in items if item]


def _apply(opts: MountOptions, values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if key in ("upperdir", "workdir", "fsname", "log", "pidfile") and not value:
            raise InvalidOption(f"{key}= needs a value")
        if key == "upperdir":
            opts.upperdir = os.path.abspath(str(value))
        elif key == "workdir":
            opts.workdir = os.path.abspath(str(value))
        elif key == "whiteout":
            try:
                opts.whiteout = WhiteoutFormat(str(value))
            except ValueError as exc:
                raise InvalidOption(f"whiteout= must be overlay or aufs, not {value!r}") from exc
        elif key == "xattr_namespace":
            if value not in ("trusted", "user"):
                raise InvalidOption(f"xattr_namespace= must be trusted or user, not {value!r}")
            opts.opaque_xattr = (
                OVERLAY_OPAQUE_XATTR if value == "trusted" else OVERLAY_OPAQUE_XATTR_USER
            )
        elif key == "fsname":
            opts.fsname = str(value)
        elif key == "log":
            opts.log = os.path.abspath(str(value))
        elif key == "pidfile":
            opts.pidfile = os.path.abspath(str(value))
        elif key == "timeout":
            try:
                opts.upper_timeout = float(str(value))
            except ValueError as exc:
                raise InvalidOption(f"timeout= must be a number, not {value!r}") from exc
        elif key in ("allow_other", "debug", "noauto_unmount", "ro", "auto_unmount"):
            if key == "allow_other":
                opts.allow_other = True
            elif key == "debug":
                opts.debug = True
            elif key == "noauto_unmount":
                opts.auto_unmount = False
            elif key == "auto_unmount":
                opts.auto_unmount = True
            elif key == "ro":
                opts.readonly = True
        elif key not in IGNORED_FLAGS:
            raise InvalidOption(f"unknown option {key!r}")
