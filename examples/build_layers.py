"""Build an image the way a Dockerfile does, one layer per step, with a graph driver.

What it shows:

1. ``FROM``: ``import_image`` stacks a base image; its top layer is where the build starts.
2. ``RUN``: each step is ``driver.create(step, parent)``, then ``driver.mounted(step)`` and
   ordinary file operations on the mounted tree: write a file, delete one, chmod, add a
   hardlink, set an xattr. Putting the layer back *is* the commit: the layer holds exactly
   what the step changed, which ``driver.changes(step, parent)`` lists.
3. ``export_image`` writes the chain (base layers + steps) as an OCI image layout, one layer
   blob per layer, which ``umoci``, ``skopeo`` or ``import_image`` read back.
4. If ``umoci`` is installed, the exported image is unpacked with it and checked.

Run it from a checkout::

    python examples/build_layers.py                      # FROM ../shared/images/busybox:1
    python examples/build_layers.py --from IMG:TAG --output ./my-image --tag v1

The driver home is a temporary directory unless ``--home`` names one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from graphdrivers import Driver, DriverError, open_driver
from graphdrivers.image import export_image, import_image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = f"{REPO.parent / 'shared' / 'images' / 'busybox'}:1"
MOTD = "built by examples/build_layers.py\n"


def step_configure(root: Path) -> None:
    """RUN-like step 1: the kind of changes a package install or a config step makes."""
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "motd").write_text(MOTD)  # write a file

    app = root / "srv" / "app"
    app.mkdir(parents=True)
    run = app / "run.sh"
    run.write_text("#!/bin/sh\necho hello from the app\n")
    os.chmod(run, 0o755)  # chmod
    os.link(run, app / "start.sh")  # a hardlink: one inode, two names
    os.setxattr(run, "user.origin", b"build_layers")  # an xattr travels in the layer tar

    passwd = etc / "passwd"
    if passwd.exists():
        os.chmod(passwd, 0o600)  # a metadata-only change


def step_cleanup(root: Path) -> None:
    """RUN-like step 2: delete what the base brought and the build does not want."""
    for victim in ("tmp", "var/log", "home"):  # whole trees become one whiteout
        path = root / victim
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    (root / "srv" / "app" / "VERSION").write_text("1.0\n")


STEPS = [("configure", step_configure), ("cleanup", step_cleanup)]


def build(driver: Driver, base: str, output: Path, tag: str) -> list[str]:
    """FROM base, the steps, export; returns the step layer ids."""
    print(f"FROM {base}")
    top = import_image(driver, base)[-1]

    steps: list[str] = []
    parent: str = top
    for name, change in STEPS:
        layer_id = f"step-{name}"
        driver.create(layer_id, parent)
        with driver.mounted(layer_id) as root:
            change(root)
        shown = parent[:12] if len(parent) == 64 else parent  # chain ids are long
        print(f"RUN {name}: layer {layer_id} on {shown}")
        steps.append(layer_id)
        parent = layer_id

    export_image(driver, parent, output, tag=tag)
    print(f"exported {output}:{tag}")
    return steps


def show_changes(driver: Driver, steps: list[str]) -> None:
    for layer_id in steps:
        parent = driver.parent(layer_id)
        changes = driver.changes(layer_id, parent)
        print(f"changes of {layer_id}:")
        for change in changes:
            print(f"    {change}")


def verify_with_umoci(output: Path, tag: str) -> None:
    """Unpack the exported image with umoci and check the steps' results are there."""
    umoci = shutil.which("umoci")
    if umoci is None:
        print("umoci not installed: skipping the check with umoci")
        return
    with tempfile.TemporaryDirectory(prefix="build-layers-umoci-") as tmp:
        bundle = Path(tmp) / "bundle"
        subprocess.run(
            [umoci, "unpack", "--image", f"{output}:{tag}", str(bundle)],
            check=True,
            capture_output=True,
        )
        rootfs = bundle / "rootfs"
        run = rootfs / "srv" / "app" / "run.sh"
        ok = (
            (rootfs / "etc" / "motd").read_text() == MOTD
            and os.stat(run).st_ino == os.stat(rootfs / "srv" / "app" / "start.sh").st_ino
            and os.getxattr(run, "user.origin") == b"build_layers"
            and not (rootfs / "tmp").exists()
        )
        print(f"umoci unpack: {'the steps are all there' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from",
        dest="base",
        default=DEFAULT_IMAGE,
        help="base image DIR[:TAG] (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("built-image"),
        help="OCI image layout to write (default: ./built-image)",
    )
    parser.add_argument("--tag", default="built", help="tag of the result (default: built)")
    parser.add_argument("--driver", default="vfs", help="driver name (default: vfs)")
    parser.add_argument("--home", type=Path, help="driver home (default: a temporary dir)")
    parser.add_argument("--no-umoci", action="store_true", help="skip the check with umoci")
    args = parser.parse_args()

    try:
        with tempfile.TemporaryDirectory(prefix="build-layers-") as tmp:
            driver = open_driver(args.driver, args.home or Path(tmp) / "home")
            try:
                steps = build(driver, args.base, args.output, args.tag)
                show_changes(driver, steps)
                if args.home is None:
                    for layer_id in driver.list_layers():  # children first
                        driver.remove(layer_id)
            finally:
                driver.cleanup()
        if not args.no_umoci:
            verify_with_umoci(args.output, args.tag)
    except (DriverError, OSError, subprocess.CalledProcessError) as exc:
        print(f"build_layers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
