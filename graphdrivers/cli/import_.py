"""``graphdrivers import SOURCE[:TAG]``: stack an OCI image's layers in the driver.

SOURCE is an OCI image layout directory (or what :func:`graphdrivers.image.import_image`
accepts, such as a ``docker save`` tar); TAG picks a manifest by its ref name. Prints each
layer id, base first, so the last line is the top layer.
"""

from __future__ import annotations

import argparse
import os

from graphdrivers.cli.common import Progress, Subparsers, driver_from_args


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import",
        parents=[common],
        help="import an OCI image's layers",
        description="Apply every layer of image SOURCE[:TAG]; print the ids.",
    )
    p.add_argument("source", metavar="SOURCE[:TAG]")
    p.set_defaults(func=run)


def split_source(source: str) -> tuple[str, str | None]:
    """``dir:tag`` -> (dir, tag); a path that exists as written keeps its colons."""
    if os.path.exists(source):
        return source, None
    path, sep, tag = source.rpartition(":")
    if sep and path and "/" not in tag:
        return path, tag
    return source, None


def run(args: argparse.Namespace) -> int:
    from graphdrivers.image import import_image

    source, tag = split_source(args.source)
    progress = Progress(f"import {os.path.basename(source.rstrip('/'))}")
    try:
        with driver_from_args(args) as driver:
            ids = import_image(driver, source, tag=tag, progress=progress.set)
    finally:
        progress.close()
    for layer_id in ids:
        print(layer_id)
    return 0
