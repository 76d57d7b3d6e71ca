"""``graphdrivers apply ID [--parent P] FILE|-``: unpack a layer tar into a layer.

The tar may be plain, gzip or zstd. If ID does not exist it is created on ``--parent`` first;
if it exists, ``--parent`` defaults to its recorded parent. Prints the applied size (what
``diff_size`` reports). A failed apply leaves no layer behind. A layer ``graphdrivers mount``
left mounted is refused (LayerBusy, exit 5) before anything is read or changed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import BinaryIO, cast

from graphdrivers.cli.common import (
    Progress,
    ProgressReader,
    Subparsers,
    driver_from_args,
    refuse_if_cli_mounted,
)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "apply",
        parents=[common],
        help="unpack a layer tar into a layer",
        description="Unpack layer tar FILE (or - for stdin) into layer ID.",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE", help="layer tar (plain, gzip or zstd), - for stdin")
    p.add_argument("--parent", metavar="P", help="parent of a new ID (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver, contextlib.ExitStack() as stack:
        # Held until the apply is done (apply_diff holds it anyway): no mount slips in.
        stack.enter_context(driver.store.lock())
        refuse_if_cli_mounted(driver, args.id)
        if args.file == "-":
            raw: BinaryIO = sys.stdin.buffer
            total = None
        else:
            raw = stack.enter_context(open(args.file, "rb"))
            total = os.fstat(raw.fileno()).st_size

        parent = args.parent
        if parent is None and driver.exists(args.id):
            parent = driver.parent(args.id)
        progress = Progress(f"apply {args.id}", total)
        stack.callback(progress.close)
        stream = cast(BinaryIO, ProgressReader(raw, progress)) if progress.enabled else raw
        size = driver.apply_diff(args.id, parent, stream)
    print(size)
    return 0
