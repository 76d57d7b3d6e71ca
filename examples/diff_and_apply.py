"""Carry one layer's changes from one driver home to another as a compressed layer tar.

What it shows:

1. ``driver.diff(layer, parent)`` is an uncompressed OCI layer tar of what the layer changed
   (with ``.wh.`` whiteouts for deletions); here it is gzipped into ``change.tar.gz``.
2. The same base image imported into a second home (possibly another driver) gets the same
   layer ids, because ids are the image's chain ids: the tar's parent is found by name.
3. ``apply_diff(new, parent, file)`` unpacks the (gzip, zstd or plain) tar into a new layer
   there, and ``changes`` on both sides agree.

Run it from a checkout::

    python examples/diff_and_apply.py                    # vfs -> vfs, busybox base
    python examples/diff_and_apply.py --to-driver overlay --output ./change.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path

from graphdrivers import Driver, DriverError, open_driver
from graphdrivers.image import import_image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = f"{REPO.parent / 'shared' / 'images' / 'busybox'}:1"


def make_change(driver: Driver, base: str) -> str:
    """A child of ``base`` holding a new file, a changed file and a deletion."""
    driver.create("change", base)
    with driver.mounted("change") as root:
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "greeting").write_text("carried over in a layer tar\n")
        (root / "etc" / "hostname").write_text("diff-and-apply\n")
        bin_rm = root / "bin" / "rm"
        if bin_rm.exists() or bin_rm.is_symlink():
            bin_rm.unlink()
    return "change"


def export_diff(driver: Driver, layer_id: str, parent: str, path: Path) -> int:
    """Write ``diff(layer, parent)`` gzipped to ``path``; returns the uncompressed size."""
    size = 0
    with driver.diff(layer_id, parent) as tar, gzip.GzipFile(path, "wb", mtime=0) as out:
        while chunk := tar.read(1 << 16):
            out.write(chunk)
            size += len(chunk)
    return size


def run(args: argparse.Namespace, work: Path) -> None:
    source = open_driver(args.from_driver, args.home or work / "home-a")
    target = open_driver(args.to_driver, work / "home-b")
    try:
        base = import_image(source, args.image)[-1]
        layer = make_change(source, base)
        size = export_diff(source, layer, base, args.output)
        print(
            f"diff of {layer} against {base[:12]}: {size} bytes of tar, "
            f"{args.output.stat().st_size} gzipped in {args.output}"
        )

        # The same image in the other home: same chain ids, so the parent is there by name.
        if import_image(target, args.image)[-1] != base:
            raise DriverError(f"{args.image} got another top layer id in {args.to_driver}")
        with args.output.open("rb") as tar:
            applied = target.apply_diff("change-copy", base, tar)  # type: ignore[arg-type]
        print(f"applied to {args.to_driver} as change-copy: {applied} bytes of content")

        here = [str(c) for c in source.changes(layer, base)]
        there = [str(c) for c in target.changes("change-copy", base)]
        print("changes:", *here, sep="\n    ")
        print("the same changes on both sides" if here == there else "the changes DIFFER")
        if here != there:
            raise SystemExit(1)
    finally:
        for driver in (source, target):
            driver.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "image",
        nargs="?",
        default=DEFAULT_IMAGE,
        help="base image DIR[:TAG] (default: %(default)s)",
    )
    parser.add_argument("--driver", default="vfs", help="driver of both homes (default: vfs)")
    parser.add_argument("--from-driver", help="driver the change is made in (default: --driver)")
    parser.add_argument("--to-driver", help="driver the change is applied to (default: --driver)")
    parser.add_argument("--home", type=Path, help="home of the first driver (default: temp)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("change.tar.gz"),
        help="where the layer tar goes (default: ./change.tar.gz)",
    )
    args = parser.parse_args()
    args.from_driver = args.from_driver or args.driver
    args.to_driver = args.to_driver or args.driver

    work = Path(tempfile.mkdtemp(prefix="diff-and-apply-"))
    try:
        run(args, work)
    except DriverError as exc:
        print(f"diff_and_apply: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
