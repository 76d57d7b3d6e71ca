"""A throwaway VM running Debian's cloud kernel, to hold pool images up to the real dm-thin.

The machine that runs the tests has no device-mapper, so this boots a kernel that has it under
qemu's software emulation (TCG: this machine's KVM cannot boot a stock kernel), with a small
initramfs, and hands it disk images as virtio disks (``/dev/vda``, ``/dev/vdb``, ...). The VM
runs one shell script, prints what it finds on the serial console and powers off; the caller
reads the console text and the images the kernel wrote.

Everything is built once and cached, keyed by the kernel package, under :data:`CACHE_DIR`::

    .cache/vm/                               (git-ignored; GRAPHDRIVERS_VM_CACHE overrides it)
    ├── .lock                                flock held while building
    └── linux-image-6.1.0-57-cloud-amd64/    one directory per kernel package (its ABI name)
        ├── vmlinuz                          the package's bzImage
        ├── initramfs.cpio.gz                busybox, dmsetup + its libraries, modules, /init
        ├── modules.txt                      the modules /init loads, in load order
        └── READY                            written last: the directory is complete

Building takes about ten seconds: ``apt-get download`` of the kernel package (27 MB, from the
Debian mirror apt already uses), ``dpkg-deb -x`` into a temporary directory (no install hooks
run), then the modules that dm-thin and virtio disks need, found through each module's
``depends=`` (the package has no ``modules.dep``). Later runs only check that READY exists.

Each run adds a second, small cpio archive after the cached one (the kernel unpacks
concatenated archives in order): it carries the script as ``/test.sh`` and any files the
script needs under ``/payload``. ``/init`` mounts /proc, /sys and devtmpfs, loads the modules,
runs ``/test.sh`` and calls ``poweroff -f`` so qemu exits. Console lines that the script prints
are returned as they are; ``GD-EXIT <status>`` tells how the script ended.

:class:`Unavailable` says which tool or package is missing, for the tests to skip with.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("GRAPHDRIVERS_VM_CACHE", REPO / ".cache" / "vm"))
LOCK_FILE = ".lock"
READY_MARKER = "READY"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
MODULES_FILE = "modules.txt"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")  # Debian package busybox-static
DMSETUP = Path("/usr/sbin/dmsetup")  # Debian package dmsetup

# Loaded in this order, each after what its depends= names. crc32c_generic first: libcrc32c
# asks the crypto API for "crc32c" (a soft dependency that nothing would load for us); the
# cloud kernel has it built in, and then it is skipped.
ROOT_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "dm-thin-pool")
MODULE_SUFFIXES = (".ko.xz", ".ko")

# The script's markers on the console.
EXIT_MARKER = "GD-EXIT"
BOOT_TIMEOUT = 120.0  # seconds, for a whole run: boot, script and power-off

INIT_SCRIPT = """\
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin:/sbin DM_DISABLE_UDEV=1
for m in $(cat /modules/order); do
    insmod /modules/$m || echo "GD-ERROR insmod $m"
done
echo GD-BOOTED
sh -e /test.sh
echo "GD-EXIT $?"
sync
poweroff -f
"""


class Unavailable(Exception):
    """Something the VM needs is missing here; the message names it."""


@dataclasses.dataclass(frozen=True)
class BootImage:
    """A kernel and the initramfs built for it."""

    package: str
    kernel: Path
    initramfs: Path
    modules: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class VMRun:
    """What one boot printed, and how its script ended (None: no GD-EXIT line was seen)."""

    console: str
    exit_status: int | None
    seconds: float

    def lines(self, prefix: str) -> list[str]:
        """The console lines that start with ``prefix`` (carriage returns removed)."""
        return [ln for ln in self.console.replace("\r", "").splitlines() if ln.startswith(prefix)]


# ---------------------------------------------------------------------- preparing (cached)


def prepare(cache_dir: Path = CACHE_DIR) -> BootImage:
    """The cached kernel and initramfs, building them first if needed (idempotent)."""
    for tool in (QEMU, "apt-get", "apt-cache", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            raise Unavailable(f"needs {tool} (see bootstrap's Debian packages)")
    for path, package in ((BUSYBOX, "busybox-static"), (DMSETUP, "dmsetup")):
        if not path.exists():
            raise Unavailable(f"needs {path} (Debian package {package})")

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        package = _kernel_package(cache_dir)
        target = cache_dir / package
        if not (target / READY_MARKER).exists():
            _build(package, target)
        modules = tuple((target / MODULES_FILE).read_text().split())
        return BootImage(package, target / KERNEL_FILE, target / INITRAMFS_FILE, modules)


def _kernel_package(cache_dir: Path) -> str:
    """The kernel package the meta-package points at now (apt's lists, no network)."""
    run = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True, check=False
    )
    found = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)\b", run.stdout)
    if found:
        return found[0]
    cached = sorted(p.parent.name for p in cache_dir.glob(f"*/{READY_MARKER}"))
    if cached:
        return cached[-1]
    raise Unavailable(
        f"apt knows no {KERNEL_META_PACKAGE} (run apt-get update): {run.stderr.strip()}"
    )


def _build(package: str, target: Path) -> None:
    log.info("building the test VM for %s in %s", package, target)
    with tempfile.TemporaryDirectory(prefix="gd-vm-") as tmp_name:
        tmp = Path(tmp_name)
        download = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        debs = list(tmp.glob(f"{package}_*.deb"))
        if download.returncode != 0 or not debs:
            raise Unavailable(f"apt-get download {package} failed: {download.stderr.strip()}")
        root = tmp / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)

        kernels = sorted(root.glob("boot/vmlinuz-*"))
        module_dirs = sorted(root.glob("lib/modules/*/kernel"))
        if not kernels or not module_dirs:
            raise Unavailable(f"{debs[0].name} holds no boot/vmlinuz-* or lib/modules")
        builtin = {
            _canonical(_module_name(Path(line)))
            for line in (module_dirs[0].parent / "modules.builtin").read_text().split()
        }
        order = _module_order(_index_modules(module_dirs[0]), ROOT_MODULES, builtin)

        staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=target.parent))
        try:
            shutil.copyfile(kernels[0], staging / KERNEL_FILE)
            modules = {f"{name}.ko": _module_bytes(path) for name, path in order}
            (staging / INITRAMFS_FILE).write_bytes(gzip.compress(_base_archive(modules), 6))
            (staging / MODULES_FILE).write_text("".join(f"{n}.ko\n" for n, _ in order))
            (staging / READY_MARKER).write_text(f"{debs[0].name}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _canonical(name: str) -> str:
    return name.replace("-", "_")  # the kernel treats - and _ in module names alike


def _index_modules(kernel_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for suffix in MODULE_SUFFIXES:
        for path in kernel_dir.rglob(f"*{suffix}"):
            index.setdefault(_canonical(_module_name(path)), path)
    return index


def _module_order(
    index: Mapping[str, Path], roots: Iterable[str], builtin: set[str]
) -> list[tuple[str, Path]]:
    """Every module the roots need, each after the ones its ``depends=`` names.

    A module built into the kernel (``modules.builtin``) needs no loading.
    """
    order: list[tuple[str, Path]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = _canonical(name)
        if key in done or key in builtin:
            return
        if key in chain:
            raise Unavailable(f"module dependency loop: {' -> '.join((*chain, key))}")
        if key not in index:
            raise Unavailable(f"the kernel package has no module {name}")
        path = index[key]
        for dep in modinfo(_module_bytes(path)).get("depends", "").split(","):
            if dep:
                visit(dep, (*chain, key))
        done.add(key)
        order.append((_module_name(path), path))

    for root in roots:
        visit(root, ())
    return order


def modinfo(module: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` ELF section (64-bit LE ELF)."""
    if module[:6] != b"\x7fELF\x02\x01":
        raise Unavailable("a kernel module is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", module, shoff + i * shentsize
        )
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name_at, offset, size = section(i)
        name = module[names_at + name_at : module.index(b"\0", names_at + name_at)]
        if name == b".modinfo":
            info: dict[str, str] = {}
            for item in module[offset : offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    return {}


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


# ---------------------------------------------------------------------- the initramfs


def _shared_libraries(binary: Path) -> list[Path]:
    """The libraries ldd lists for a binary (none for a static one)."""
    run = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs = []
    for line in run.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _base_archive(modules: Mapping[str, bytes]) -> bytes:
    """The cached part of the initramfs: tools, libraries, modules and /init."""
    archive = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "payload", "modules", "etc"):
        archive.directory(d)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("sbin/dmsetup", DMSETUP.read_bytes(), 0o755)
    for lib in {*_shared_libraries(BUSYBOX), *_shared_libraries(DMSETUP)}:
        archive.file(str(lib).lstrip("/"), lib.resolve().read_bytes(), 0o755)
    for name, data in modules.items():
        archive.file(f"modules/{name}", data, 0o644)
    archive.file("modules/order", "".join(f"{n}\n" for n in modules).encode(), 0o644)
    return archive.finish()


def run_archive(script: str, payload: Mapping[str, bytes]) -> bytes:
    """The per-run archive: ``/test.sh`` and ``/payload/<name>`` files."""
    archive = CpioWriter()
    archive.file("test.sh", script.encode(), 0o755)
    for name, data in payload.items():
        if "/" in name:
            raise ValueError(f"payload names are plain file names: {name!r}")
        archive.file(f"payload/{name}", data, 0o644)
    return archive.finish()


class CpioWriter:
    """A cpio archive in the "newc" format, the one the kernel unpacks into its rootfs.

    Parent directories are added as needed; every file belongs to root.
    """

    TRAILER = "TRAILER!!!"

    def __init__(self) -> None:
        self._out = bytearray()
        self._dirs: set[str] = set()
        self._ino = 1

    def directory(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | 0o755, b"")

    def file(self, path: str, data: bytes, mode: int) -> None:
        path = path.strip("/")
        if "/" in path:
            self.directory(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry(self.TRAILER, 0, b"")
        return bytes(self._out)

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        raw_name = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw_name), 0)
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw_name
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)


# ---------------------------------------------------------------------- running


def boot(
    image: BootImage,
    disks: Sequence[Path],
    script: str,
    payload: Mapping[str, bytes] | None = None,
    *,
    timeout: float = BOOT_TIMEOUT,
    memory_mib: int = 256,
) -> VMRun:
    """Boot the VM with ``disks`` as /dev/vda, /dev/vdb, ... and run ``script`` in it.

    The VM is gone when this returns: it powered itself off, or it was killed at ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="gd-vm-run-") as tmp_name:
        initrd = Path(tmp_name) / "initramfs"
        initrd.write_bytes(
            image.initramfs.read_bytes() + gzip.compress(run_archive(script, payload or {}), 1)
        )
        command = [
            QEMU,
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-m",
            str(memory_mib),
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 quiet",
            "-serial",
            "stdio",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ]
        for disk in disks:
            command += ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]

        start = time.monotonic()
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[killed by the test after {timeout:.0f} s]\n".encode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - start

    console = out.decode("utf-8", "replace")
    run = VMRun(console, None, seconds)
    ends = run.lines(EXIT_MARKER + " ")
    status = int(ends[-1].split()[1]) if ends else None
    log.debug("VM ran %.1f s, script status %s", seconds, status)
    return dataclasses.replace(run, exit_status=status)


def digest(data: bytes) -> str:
    """What busybox sha256sum prints for ``data``."""
    return hashlib.sha256(data).hexdigest()
