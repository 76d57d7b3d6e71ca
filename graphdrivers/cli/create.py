"""``graphdrivers create ID [--parent P] [--rw] [--storage-opt k=v]``: make a layer.

Prints the new layer id as its last line, so scripts can capture it.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args, parse_pairs


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "create",
        parents=[common],
        help="create a layer (empty or on a parent)",
        description="Create layer ID holding PARENT's content (empty without).",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--parent", metavar="P", help="the layer to start from")
    p.add_argument("--rw", action="store_true", help="a writable (container) layer")
    p.add_argument(
        "--storage-opt",
        action="append",
        metavar="KEY=VALUE",
        help="per-layer storage option, e.g. size=1G (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage_opt = parse_pairs(args.storage_opt, "storage option")
    with driver_from_args(args) as driver:
        driver.create(args.id, args.parent, rw=args.rw, storage_opt=storage_opt or None)
    print(args.id)
    return 0
