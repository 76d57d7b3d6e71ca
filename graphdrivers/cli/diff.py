"""``graphdrivers diff ID [--parent P | --full] [-o FILE] [--compress gzip|zstd|none]``.

Writes the OCI layer tar of ID's changes against its recorded parent (or ``--parent P``, or
against nothing with ``--full``) to FILE or stdout. Compression is deterministic (gzip with a
zero timestamp), so an unchanged layer gives the same bytes and digest every time. Binary
output to a terminal is refused (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
from collections.abc import Iterator
from typing import IO, cast

from graphdrivers.cli.common import Subparsers, UsageError, driver_from_args

CHUNK = 1 << 20


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    # Here -o is the output file; driver options go before the verb or as --option.
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="write a layer's changes as a layer tar",
        description="Write the OCI layer tar of ID's changes against a parent.",
        conflict_handler="resolve",
    )
    p.add_argument("id", metavar="ID")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--parent", metavar="P", help="compare with P (default: ID's parent)")
    which.add_argument("--full", action="store_true", help="the whole tree, as all added")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    p.add_argument(
        "--compress",
        choices=("none", "gzip", "zstd"),
        default="none",
        help="compression of the written tar (default: none)",
    )
    p.set_defaults(func=run)


@contextlib.contextmanager
def compressor(raw: IO[bytes], kind: str) -> Iterator[IO[bytes]]:
    """A writer that compresses into ``raw`` (``none`` writes straight through)."""
    if kind == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            yield cast(IO[bytes], gz)
    elif kind == "zstd":
        import zstandard

        with zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as zw:
            yield cast(IO[bytes], zw)
    else:
        yield raw


def run(args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        raise UsageError(
            "refusing to write a binary layer tar to a terminal; use -o FILE or redirect stdout"
        )

    with driver_from_args(args) as driver:
        parent = None if args.full else args.parent or driver.parent(args.id)
        try:
            with contextlib.ExitStack() as stack:
                raw: IO[bytes] = (
                    stack.enter_context(open(args.output, "wb"))
                    if args.output
                    else sys.stdout.buffer
                )
                out = stack.enter_context(compressor(raw, args.compress))
                stream = stack.enter_context(driver.diff(args.id, parent))
                shutil.copyfileobj(stream, out, CHUNK)
        except BaseException:
            if args.output is not None:  # leave no half-written tar that looks whole
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(args.output)
            raise
        if args.output is None:
            sys.stdout.buffer.flush()
    return 0
