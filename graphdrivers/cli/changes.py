"""``graphdrivers changes ID [--parent P] [--json]``: what ID changed against its parent.

Text output is one line a path, as ``docker diff`` prints them: ``A /path`` added, ``C /path``
changed, ``D /path`` deleted. ``--json`` gives ``[{"path", "kind"}]`` with kind ``add``,
``modify`` or ``delete``.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, driver_from_args, print_json


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "changes",
        parents=[common],
        help="list a layer's changed paths",
        description="List paths ID added (A), changed (C) and deleted (D).",
    )
    p.add_argument("id", metavar="ID")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--parent", metavar="P", help="compare with P (default: ID's parent)")
    which.add_argument("--full", action="store_true", help="against nothing: all added")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver:
        parent = None if args.full else args.parent or driver.parent(args.id)
        found = driver.changes(args.id, parent)

    if args.json:
        print_json([{"path": c.path, "kind": c.kind.name.lower()} for c in found])
    else:
        for change in found:
            print(change)
    return 0
