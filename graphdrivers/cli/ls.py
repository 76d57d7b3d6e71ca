"""``graphdrivers ls [--json]``: every layer, children before parents, with its parent.

Text output is one layer a line: ``ID PARENT`` (``-`` for none), plus ``mounted`` when a
``graphdrivers mount`` left it mounted. ``--json`` gives a list of
``{"id", "parent", "mounted", "metadata"}`` objects in the same order.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, cli_mounts, driver_from_args, print_json


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ls",
        parents=[common],
        help="list layers (children first)",
        description="List every layer, children before parents.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver:
        mounted = cli_mounts(driver)
        rows = [
            {
                "id": lid,
                "parent": driver.parent(lid),
                "mounted": lid in mounted,
                "metadata": driver.metadata(lid),
            }
            for lid in driver.list_layers()
        ]

    if args.json:
        print_json(rows)
        return 0
    width = max((len(str(r["id"])) for r in rows), default=2)
    for row in rows:
        line = f"{row['id']!s:<{width}}  {row['parent'] or '-'}"
        print(line + ("  mounted" if row["mounted"] else ""))
    return 0
