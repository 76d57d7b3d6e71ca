"""``graphdrivers mount ID [--readonly]`` (alias ``get``): mount a layer and print the path.

The mount outlives this process: it is recorded in the home's CLI mount record and undone by
``graphdrivers umount ID`` (see :mod:`graphdrivers.cli.common`). Mounting a layer the CLI
already mounted in the same mode prints the recorded path again; in the other mode it is
LayerBusy (exit 5). Two ``mount`` commands at once mount the layer once.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args, mount_for_cli


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    for name in ("mount", "get"):
        p = sub.add_parser(
            name,
            parents=[common],
            help="mount a layer, print its mountpoint",
            description="Mount layer ID and print the mountpoint; "
            "'graphdrivers umount ID' undoes it.",
        )
        p.add_argument("id", metavar="ID")
        p.add_argument("--readonly", action="store_true", help="mount read-only")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args, keep_mounts=True) as driver:
        path = mount_for_cli(driver, args.id, args.readonly)
    print(path)
    return 0
