"""``graphdrivers status [--json]``: the driver's structured status.

Text output is ``key: value`` lines with the driver-specific fields indented under ``extra``;
``--json`` prints :meth:`graphdrivers.driver.Status.as_dict` plus ``cli_mounts``.
"""

from __future__ import annotations

import argparse

from graphdrivers.cli.common import Subparsers, cli_mounts, driver_from_args, print_json


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="show the driver's status",
        description="Show the driver's structured status.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with driver_from_args(args) as driver:
        data = driver.status().as_dict()
        data["cli_mounts"] = sorted(cli_mounts(driver))

    if args.json:
        print_json(data)
        return 0
    for key, value in data.items():
        if key == "extra":
            print("extra:")
            for k, v in sorted(dict(value).items()):  # type: ignore[call-overload]
                print(f"  {k}: {v}")
        elif key == "cli_mounts":
            print(f"cli_mounts: {', '.join(value) or '-'}")  # type: ignore[arg-type]
        else:
            print(f"{key}: {value}")
    return 0
