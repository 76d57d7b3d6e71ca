"""Facts about this host that graph drivers depend on, each with how a user gets what is missing.

Every check returns a :class:`Check`: what was looked for, whether it is there, what was found,
and a hint (the Debian package, ``modprobe`` line or privilege) for when it is not. Drivers use
these from ``_check_host`` to raise :class:`~graphdrivers.errors.NotSupported` with the same
words that ``graphdrivers doctor`` prints::

    check = hostcheck.kernel_filesystem("btrfs")
    if not check.ok:
        raise NotSupported(check.what, hint=check.hint, driver="btrfs")

:func:`driver_requirements` lists what each backend (registered or planned) needs, so ``doctor``
can explain a backend before its code exists on this host. Nothing here changes the host: the
checks read ``/proc``, ``/dev``, ``PATH`` and ``/lib/modules``, and run ``dmsetup targets`` at
most (read-only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from graphdrivers.fsutil.fstype import filesystem_type

log = logging.getLogger(__name__)

PROC_FILESYSTEMS = Path("/proc/filesystems")
PROC_MISC = Path("/proc/misc")
PROC_STATUS = Path("/proc/self/status")
MODULES_ROOT = Path("/lib/modules")
DEV_FUSE = Path("/dev/fuse")
DEV_LOOP_CONTROL = Path("/dev/loop-control")
DEV_MAPPER_CONTROL = Path("/dev/mapper/control")
CAP_SYS_ADMIN = 21

# Which Debian package provides each tool the drivers run.
TOOL_PACKAGES: dict[str, str] = {
    "fusermount3": "fuse3",
    "mkfs.btrfs": "btrfs-progs",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "losetup": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "dmsetup": "dmsetup",
    "thin_check": "thin-provisioning-tools",
    "modprobe": "kmod",
}

# Python modules a driver imports, and where they come from.
PYTHON_MODULES: dict[str, str] = {
    "pyfuse3": "pip install pyfuse3 (needs Debian libfuse3-dev, pkg-config, gcc)",
    "trio": "pip install trio",
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One host fact: ``what`` names it ("kernel filesystem btrfs"), ``ok`` says if it holds."""

    what: str
    ok: bool
    detail: str = ""
    hint: str = ""

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def kernel_filesystems() -> set[str]:
    """Filesystem type names the running kernel has registered (``/proc/filesystems``)."""
    names = set()
    for line in _read(PROC_FILESYSTEMS).splitlines():
        fields = line.split()
        if fields:
            names.add(fields[-1])
    return names


def module_available(name: str) -> bool:
    """True if a kernel module ``name`` is built in or installed for the running kernel."""
    release = os.uname().release
    base = MODULES_ROOT / release
    for index in ("modules.builtin", "modules.dep"):
        for line in _read(base / index).splitlines():
            module_path = line.split(":", 1)[0]
            stem = Path(module_path).name.split(".ko")[0]
            if stem.replace("-", "_") == name.replace("-", "_"):
                return True
    return False


def kernel_filesystem(name: str) -> Check:
    """The kernel can mount filesystem ``name`` now, or after ``modprobe name``."""
    what = f"kernel filesystem {name}"
    if name in kernel_filesystems():
        return Check(what, True, "registered in /proc/filesystems")
    if module_available(name):
        return Check(what, False, "module installed but not loaded", hint=f"modprobe {name}")
    return Check(
        what,
        False,
        "not in /proc/filesystems and no module for this kernel",
        hint=f"use a kernel with CONFIG_{name.upper()}_FS (or the module) and modprobe {name}",
    )


def tool(name: str) -> Check:
    """Program ``name`` is on PATH."""
    found = shutil.which(name)
    package = TOOL_PACKAGES.get(name)
    hint = f"apt-get install {package}" if package else f"install {name}"
    if found:
        return Check(f"tool {name}", True, found)
    return Check(f"tool {name}", False, "not on PATH", hint=hint)


def device(path: Path, hint: str) -> Check:
    """Device node ``path`` exists."""
    if path.exists():
        return Check(f"device {path}", True, "present")
    return Check(f"device {path}", False, "missing", hint=hint)


def python_module(name: str) -> Check:
    """Python module ``name`` is importable in this interpreter."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    hint = PYTHON_MODULES.get(name, f"pip install {name}")
    if spec is not None:
        return Check(f"python module {name}", True, spec.origin or "found")
    return Check(f"python module {name}", False, "not importable", hint=hint)


def effective_capabilities() -> int:
    """The CapEff bit mask of this process (0 when /proc says nothing)."""
    for line in _read(PROC_STATUS).splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privilege_sys_admin() -> Check:
    """The process may mount filesystems and manage loop and dm devices (CAP_SYS_ADMIN)."""
    what = "privilege CAP_SYS_ADMIN"
    if effective_capabilities() & (1 << CAP_SYS_ADMIN):
        return Check(what, True, "running as root" if os.geteuid() == 0 else "capability held")
    return Check(what, False, f"uid {os.geteuid()} without CAP_SYS_ADMIN", hint="run as root")


def device_mapper_kernel() -> Check:
    """The kernel has device-mapper (``/proc/misc`` lists it and the control node exists)."""
    what = "kernel device-mapper"
    listed = any(line.split()[-1:] == ["device-mapper"] for line in _read(PROC_MISC).splitlines())
    if listed and DEV_MAPPER_CONTROL.exists():
        return Check(what, True, f"{DEV_MAPPER_CONTROL} present")
    if module_available("dm_mod"):
        return Check(what, False, "module dm_mod not loaded", hint="modprobe dm_mod")
    return Check(
        what,
        False,
        "no device-mapper in /proc/misc and no dm_mod module",
        hint="use a kernel with CONFIG_BLK_DEV_DM (the userspace thin pool needs no kernel dm)",
    )


def dm_target(name: str) -> Check:
    """Device-mapper target ``name`` (``thin-pool``) is loaded or loadable."""
    what = f"kernel dm target {name}"
    dmsetup = shutil.which("dmsetup")
    if dmsetup and DEV_MAPPER_CONTROL.exists():
        try:
            out = subprocess.run(
                [dmsetup, "targets"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("dmsetup targets failed: %s", exc)
            out = ""
        if any(line.split()[:1] == [name] for line in out.splitlines()):
            return Check(what, True, "listed by dmsetup targets")
    module = "dm_thin_pool" if name == "thin-pool" else f"dm_{name.replace('-', '_')}"
    if module_available(module):
        return Check(what, False, f"module {module} not loaded", hint=f"modprobe {module}")
    return Check(
        what,
        False,
        "not loaded and no module for this kernel",
        hint="use a kernel with CONFIG_DM_THIN_PROVISIONING",
    )


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a home need not exist yet)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def backing_filesystem(home: Path, wanted: str | None = None) -> Check:
    """The filesystem ``home`` lives on (or would live on); with ``wanted``, whether it matches."""
    where = existing_ancestor(home)
    fstype = filesystem_type(where)
    if wanted is None:
        return Check(f"backing filesystem of {home}", True, fstype)
    what = f"backing filesystem {wanted} at {home}"
    if fstype == wanted:
        return Check(what, True, fstype)
    return Check(
        what,
        False,
        f"{where} is on {fstype}",
        hint=f"pass --home on a {wanted} filesystem, e.g. a loopback image: truncate -s 4G img; "
        f"mkfs.{wanted} img; mount -o loop img DIR",
    )


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What one backend needs from the host, checked now, and the warnings that apply."""

    driver: str
    checks: list[Check]
    warnings: list[str]
    variants: dict[str, list[Check]] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if every check passes (and, with variants, at least one variant passes)."""
        if not all(c.ok for c in self.checks):
            return False
        return not self.variants or any(all(c.ok for c in v) for v in self.variants.values())

    def missing(self) -> list[Check]:
        """The failing checks (for variants, those of the variant closest to passing)."""
        out = [c for c in self.checks if not c.ok]
        if self.variants and not any(all(c.ok for c in v) for v in self.variants.values()):
            best = min(self.variants.values(), key=lambda v: sum(not c.ok for c in v))
            out += [c for c in best if not c.ok]
        return out


def _union_checks() -> list[Check]:
    return [
        device(DEV_FUSE, "modprobe fuse (and in a container: --device /dev/fuse)"),
        kernel_filesystem("fuse"),
        tool("fusermount3"),
        python_module("pyfuse3"),
        python_module("trio"),
    ]


def _union_style_warnings(home: Path) -> list[str]:
    fstype = filesystem_type(existing_ancestor(home))
    if fstype == "btrfs":
        return [
            f"home {home} is on btrfs: union-style drivers work there but duplicate what "
            "btrfs snapshots give for free; prefer the btrfs driver"
        ]
    if fstype.startswith("overlay"):
        return [f"home {home} is on overlayfs: an overlay upper dir cannot live on overlayfs"]
    return []


def _requirements_union(home: Path) -> Requirements:
    return Requirements("union", _union_checks(), _union_style_warnings(home))


def _requirements_overlay(home: Path) -> Requirements:
    checks = [kernel_filesystem("overlay"), privilege_sys_admin()]
    return Requirements("overlay", checks, _union_style_warnings(home))


BTRFS_HOME_HINT = (
    "put the home on btrfs: a dedicated partition (mkfs.btrfs /dev/sdXN; mount it on the "
    "home's parent; full disk speed, but the space is fixed) or a loopback image (truncate -s "
    "10G img; mkfs.btrfs img; mount -o loop img DIR; no repartitioning, a loop device and a "
    "second filesystem's overhead); 'graphdrivers conformance btrfs' makes its own image"
)


def _requirements_btrfs(home: Path) -> Requirements:
    backing = backing_filesystem(home, "btrfs")
    if not backing.ok:
        backing = dataclasses.replace(backing, hint=BTRFS_HOME_HINT)
    checks = [
        kernel_filesystem("btrfs"),
        privilege_sys_admin(),
        tool("mkfs.btrfs"),
        tool("losetup"),
        device(DEV_LOOP_CONTROL, "modprobe loop"),
        backing,
    ]
    return Requirements("btrfs", checks, [])


def _requirements_devicemapper(home: Path) -> Requirements:
    kernel = [
        device_mapper_kernel(),
        dm_target("thin-pool"),
        tool("dmsetup"),
        privilege_sys_admin(),
        tool("mkfs.ext4"),
    ]
    userspace = [
        device(DEV_FUSE, "modprobe fuse"),
        tool("fusermount3"),
        python_module("pyfuse3"),
        device(DEV_LOOP_CONTROL, "modprobe loop"),
        tool("losetup"),
        tool("mkfs.ext4"),
        privilege_sys_admin(),
    ]
    warnings = [
        "devicemapper keeps its pool in sparse loopback files here: fine for learning and "
        "tests, slow for real use (give it block devices for production)"
    ]
    return Requirements(
        "devicemapper",
        [],
        warnings,
        variants={"kernel dm-thin": kernel, "userspace thin pool": userspace},
    )


def _requirements_vfs(home: Path) -> Requirements:
    return Requirements("vfs", [backing_filesystem(home)], [])


# Every backend the project has or plans, in the order doctor shows them.
REQUIREMENTS: dict[str, Callable[[Path], Requirements]] = {
    "vfs": _requirements_vfs,
    "union": _requirements_union,
    "overlay": _requirements_overlay,
    "btrfs": _requirements_btrfs,
    "devicemapper": _requirements_devicemapper,
}


def driver_requirements(driver: str, home: Path) -> Requirements | None:
    """What backend ``driver`` needs on this host for a home at ``home`` (None if unknown)."""
    factory = REQUIREMENTS.get(driver)
    return factory(home) if factory is not None else None
