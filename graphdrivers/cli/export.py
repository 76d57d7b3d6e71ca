"""``graphdrivers export ID DEST [--tag T] [--compress gzip|zstd|none]``: write an OCI image.

Writes the chain that ends in layer ID (its ancestors first) as an OCI image layout in DEST,
one layer blob per layer, and prints DEST.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a layer chain as an OCI image",
        description="Write the chain ending in ID as an OCI image layout.",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--tag", default="latest", help="ref name of the manifest (default: latest)")
    p.add_argument(
        "--compress",
        choices=("gzip", "zstd", "none"),
        default="gzip",
        help="layer blob compression (default: gzip)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphdrivers.image import export_image

    with driver_from_args(args) as driver:
        path = export_image(driver, args.id, args.dest, tag=args.tag, compress=args.compress)
    print(path)
    return 0
