"""``graphdrivers rm ID [--missing-ok]``: remove a layer without children that is not mounted."""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args, refuse_if_cli_mounted


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "rm",
        parents=[common],
        help="remove a layer",
        description="Remove layer ID (it must have no children and be unmounted).",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--missing-ok", action="store_true", help="succeed if ID does not exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver, driver.store.lock():
        refuse_if_cli_mounted(driver, args.id)
        driver.remove(args.id, missing_ok=args.missing_ok)
    return 0
