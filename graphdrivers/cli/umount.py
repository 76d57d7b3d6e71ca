"""``graphdrivers umount ID`` (alias ``put``): undo what ``graphdrivers mount ID`` left."""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args, release_cli_mount


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    for name in ("umount", "put"):
        p = sub.add_parser(
            name,
            parents=[common],
            help="unmount a layer mounted by 'mount'",
            description="Unmount layer ID, mounted earlier by 'graphdrivers "
            "mount'; NotMounted (exit 5) if it was not.",
        )
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver:
        release_cli_mount(driver, args.id)
    return 0
