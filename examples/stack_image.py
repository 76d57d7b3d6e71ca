"""Stack a real OCI image into a graph driver and look at what each layer changed.

What it shows:

1. ``import_image`` applies the image's layers bottom to top, each one a layer of the driver
   whose parent is the layer below; their ids are the image's chain ids.
2. ``driver.changes(layer, parent)`` tells, for every layer, which paths it added (A),
   changed (C) or deleted (D) -- the same answer ``docker history`` style tools give.
3. ``driver.mounted(top)`` (``get`` ... ``put``) shows the stacked root filesystem.

Run it from a checkout::

    python examples/stack_image.py                       # ../shared/images/busybox:1, vfs
    python examples/stack_image.py IMAGE_DIR:TAG --driver overlay --home /var/tmp/gd

With no ``--home`` the layers live in a temporary directory that is removed at exit.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from graphdrivers import Driver, DriverError, Kind, open_driver
from graphdrivers.image import import_image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = f"{REPO.parent / 'shared' / 'images' / 'busybox'}:1"


def summarise_layers(driver: Driver, layer_ids: Sequence[str]) -> None:
    """Print, per layer, how many paths it added, changed and deleted, and a few of them."""
    parent: str | None = None
    for number, layer_id in enumerate(layer_ids, 1):
        changes = driver.changes(layer_id, parent)
        counts = collections.Counter(c.kind for c in changes)
        print(
            f"layer {number} {layer_id[:12]}: {counts[Kind.ADD]} added, "
            f"{counts[Kind.MODIFY]} changed, {counts[Kind.DELETE]} deleted"
        )
        for change in changes[:6]:
            print(f"    {change}")
        if len(changes) > 6:
            print(f"    ... and {len(changes) - 6} more")
        parent = layer_id


def show_tree(root: Path, *, files: int = 4) -> None:
    """Print the top-level entries of a mounted tree and the start of a few small files."""
    print(f"top layer mounted at {root}: {' '.join(sorted(p.name for p in root.iterdir()))}")
    shown = 0
    for path in sorted(root.rglob("*")):
        if shown == files:
            break
        if path.is_file() and not path.is_symlink() and 0 < path.stat().st_size < 4096:
            first = path.read_text(errors="replace").splitlines()[0]
            print(f"    /{path.relative_to(root)}: {first[:60]}")
            shown += 1


def run(args: argparse.Namespace, home: Path) -> None:
    driver = open_driver(args.driver, home)
    try:
        print(f"importing {args.image} into {args.driver} at {home}")
        ids = import_image(driver, args.image)
        print(f"{len(ids)} layers, top {ids[-1]}")
        summarise_layers(driver, ids)
        with driver.mounted(ids[-1], readonly=True) as root:
            show_tree(root)
        if args.keep:
            return
        for layer_id in driver.list_layers():  # children first, so each can go
            driver.remove(layer_id)
        print("removed the layers again")
    finally:
        driver.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "image",
        nargs="?",
        default=DEFAULT_IMAGE,
        help="OCI layout DIR[:TAG] or docker save archive (default: %(default)s)",
    )
    parser.add_argument("--driver", default="vfs", help="driver name (default: vfs)")
    parser.add_argument("--home", type=Path, help="driver home (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the layers in --home")
    args = parser.parse_args()

    try:
        if args.home is not None:
            run(args, args.home)
        else:
            with tempfile.TemporaryDirectory(prefix="stack-image-") as tmp:
                run(args, Path(tmp) / "home")
    except DriverError as exc:
        print(f"stack_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
