"""``graphdrivers mount ID [--readonly]`` (alias ``get``): mount a layer and print the path.

The mount outlives this process: it is recorded in the home's CLI mount record and undone by
``graphdrivers umount ID`` (see :mod:`graphdrivers.cli.common`). Mounting a layer the CLI
already mounted prints the recorded path again.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, cli_mounts, driver_from_args, record_cli_mount


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
        known = cli_mounts(driver).get(args.id)
        if known is not None and driver.exists(args.id):
            print(known["path"])
            return 0
        path = driver.get(args.id, readonly=args.readonly)
        record_cli_mount(driver, args.id, path, args.readonly)
    print(path)
    return 0
