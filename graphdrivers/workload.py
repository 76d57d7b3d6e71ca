"""The built-in workload: a deterministic rootfs-like base layer and three change layers.

``graphdrivers compare`` runs every driver over the same layer stack without downloading
anything, so the stack is generated here from a seeded :class:`random.Random`. For one seed the
layer tars are byte-for-byte identical on every run and machine.

The stack::

    base       a Debian-like tree: merged-/usr symlinks (bin -> usr/bin), usr/lib with versioned
               .so symlinks, usr/share/{doc,man,locale}, etc, var/lib/dpkg, home/user (uid 1000),
               tmp 1777; about 3,000 files of log-normal sizes (~40 MiB); relative, absolute and
               dangling symlinks; hardlink groups; a setuid and a setgid binary; ``user.*`` and
               ``security.capability`` xattrs; a mostly-zero (sparse on disk) image; a FIFO
    install    a new package tree, a rewritten dpkg status, a few docs deleted, a new hardlink
               to a file of the base (the base file is re-emitted, as OCI requires)
    cleanup    a whole subtree deleted (usr/share/man), locales deleted, a file and a directory
               renamed, etc/passwd modified, an xattr changed, a capability dropped, a chmod
    config     an opaque directory (etc/cron.daily deleted and recreated), a directory replaced
               by a file and a file by a directory, a symlink retargeted, a same-size rewrite,
               a hardlink between two new names

Each layer is kept twice: as a *model* (the entries it writes, the names it whites out, the
directories it makes opaque) and as the OCI layer tar written from that model. Stacking the
models with :func:`apply_model` gives the expected final tree independently of any tar reader,
which is what the tests hold the drivers' results against.

Tar format: uncompressed PAX, entries sorted by path component, directories named with a
trailing ``/``, fixed times, empty user and group names, xattrs as ``SCHILY.xattr.<name>``
records; deletions as ``.wh.<name>`` (mode 0600, empty) and opaque directories as
``<dir>/.wh..wh..opq``, the aufs names the OCI layer format uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from graphdrivers.whiteout import WHITEOUT_OPAQUE, WHITEOUT_PREFIX

DEFAULT_SEED = 20240601
DEFAULT_FILES = 3000
BASE_TIME = 1_700_000_000  # every mtime is this plus a seeded offset
MAX_FILE_SIZE = 4 << 20
SPARSE_SIZE = 8 << 20
LAYER_NAMES = ("base", "install", "cleanup", "config")
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

# security.capability for cap_net_raw+ep (VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE).
CAP_NET_RAW = 13
CAPABILITY_XATTR = "security.capability"
CAP_NET_RAW_VALUE = struct.pack("<5I", 0x02000001, 1 << CAP_NET_RAW, 0, 0, 0)

DIR, FILE, SYMLINK, FIFO = "dir", "file", "symlink", "fifo"


@dataclasses.dataclass(frozen=True)
class Node:
    """One entry of a tree model. Files with the same ``inode`` are one hardlink group."""

    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = BASE_TIME
    data: bytes = b""
    target: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    inode: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.kind == FILE else 0


Tree = dict[str, Node]  # relative path ("usr/bin/ls") -> node; the root is not in it


@dataclasses.dataclass
class LayerModel:
    """What one layer does to the tree below it, in OCI apply order."""

    name: str
    deletes: list[str] = dataclasses.field(default_factory=list)
    opaque: list[str] = dataclasses.field(default_factory=list)
    entries: Tree = dataclasses.field(default_factory=dict)


def path_key(path: str) -> tuple[str, ...]:
    """Sort key that puts a directory right before its own children."""
    return tuple(path.split("/"))


def _below(path: str, tree: Iterable[str]) -> list[str]:
    prefix = path + "/"
    return [p for p in tree if p.startswith(prefix)]


def apply_model(tree: Tree, layer: LayerModel) -> Tree:
    """The tree after ``layer``: whiteouts, then opaque dirs, then entries (OCI semantics)."""
    out = dict(tree)
    for path in layer.deletes:
        for victim in [path, *_below(path, out)]:
            out.pop(victim, None)
    for path in layer.opaque:
        for victim in _below(path, out):
            del out[victim]

    for path in sorted(layer.entries, key=path_key):
        node = layer.entries[path]
        old = out.get(path)
        if old is not None and not (old.kind == DIR and node.kind == DIR):
            for victim in _below(path, out):
                del out[victim]
        out[path] = node
    return out


def stack_models(layers: Iterable[LayerModel]) -> Tree:
    """The final tree of a whole stack of layer models."""
    tree: Tree = {}
    for layer in layers:
        tree = apply_model(tree, layer)
    return tree


# --------------------------------------------------------------------------- tar writing


def _tarinfo(name: str, node: Node) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = node.mode
    info.uid, info.gid = node.uid, node.gid
    info.uname = info.gname = ""
    info.mtime = node.mtime
    if node.xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
            for key, value in node.xattrs
        }
    return info


def layer_tar(layer: LayerModel) -> bytes:
    """The OCI layer tar of ``layer`` (deterministic bytes for a given model)."""
    items: list[tuple[str, Node | None]] = list(layer.entries.items())
    whiteout_node = Node(FILE, mode=0o600, mtime=BASE_TIME)
    for path in layer.deletes:
        parent, _, base = path.rpartition("/")
        items.append(((f"{parent}/" if parent else "") + WHITEOUT_PREFIX + base, whiteout_node))
    for path in layer.opaque:
        items.append((f"{path}/{WHITEOUT_OPAQUE}", None))
    items.sort(key=lambda item: path_key(item[0]))

    buf = io.BytesIO()
    leaders: dict[int, str] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, maybe_node in items:
            node = maybe_node
            if node is None:  # the opaque marker takes its directory's owner and mode
                dir_node = layer.entries[path.rpartition("/")[0]]
                node = dataclasses.replace(
                    whiteout_node,
                    mode=dir_node.mode & 0o7777,
                    uid=dir_node.uid,
                    gid=dir_node.gid,
                    xattrs=(),
                )
            _add_entry(tar, path, node, leaders)
    return buf.getvalue()


def _add_entry(tar: tarfile.TarFile, path: str, node: Node, leaders: dict[int, str]) -> None:
    info = _tarinfo(path + "/" if node.kind == DIR else path, node)
    if node.kind == DIR:
        info.type = tarfile.DIRTYPE
    elif node.kind == SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, node.target
    elif node.kind == FIFO:
        info.type = tarfile.FIFOTYPE
    elif node.inode and node.inode in leaders:
        info.type, info.linkname = tarfile.LNKTYPE, leaders[node.inode]
    else:
        if node.inode:
            leaders[node.inode] = path
        info.size = len(node.data)
        tar.addfile(info, io.BytesIO(node.data))
        return
    tar.addfile(info)


# --------------------------------------------------------------------------- generation


class _Generator:
    """Builds the four layer models from one seeded random source."""

    WORDS = (
        "the",
        "layer",
        "driver",
        "mount",
        "parent",
        "child",
        "diff",
        "apply",
        "snapshot",
        "pool",
        "thin",
        "device",
        "whiteout",
        "opaque",
        "lower",
        "upper",
        "work",
        "merged",
        "inode",
        "block",
        "extent",
        "subvolume",
        "overlay",
        "union",
        "copy",
        "config",
        "package",
        "install",
        "remove",
        "upgrade",
        "library",
        "binary",
        "share",
        "doc",
        "man",
        "locale",
    )

    def __init__(self, seed: int, files: int) -> None:
        self.rng = random.Random(seed)
        self.files = files
        self.next_inode = 1

    # -- primitives

    def inode(self) -> int:
        self.next_inode += 1
        return self.next_inode

    def mtime(self) -> int:
        return BASE_TIME + self.rng.randrange(0, 86_400 * 365)

    def size(self) -> int:
        # Log-normal around a few KiB with a long tail, as in a real /usr.
        return min(MAX_FILE_SIZE, int(self.rng.lognormvariate(math.log(5000), 1.55)))

    def text(self, size: int) -> bytes:
        line = " ".join(self.rng.choices(self.WORDS, k=12)).encode() + b"\n"
        return (line * (size // len(line) + 1))[:size]

    def binary(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def file(self, data: bytes, mode: int = 0o644, **kw: object) -> Node:
        return Node(FILE, mode=mode, mtime=self.mtime(), data=data, inode=self.inode(), **kw)  # type: ignore[arg-type]

    def dir(self, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Node:
        return Node(DIR, mode=mode, uid=uid, gid=gid, mtime=self.mtime())

    def link(self, target: str) -> Node:
        return Node(SYMLINK, mode=0o777, mtime=self.mtime(), target=target)

    # -- the base

    def base(self) -> LayerModel:
        tree: Tree = {}

        def mkdirs(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub not in tree:
                    tree[sub] = self.dir(mode if i == len(parts) else 0o755, uid, gid)

        for d in (
            "usr/bin",
            "usr/sbin",
            "usr/lib/x86_64-linux-gnu",
            "usr/share/doc",
            "usr/share/man/man1",
            "usr/share/man/man8",
            "usr/share/locale",
            "usr/share/zoneinfo/Etc",
            "etc/default",
            "etc/cron.daily",
            "etc/ssl/certs",
            "etc/alternatives",
            "var/lib/dpkg/info",
            "var/log/apt",
            "var/cache",
            "opt/legacy",
            "srv/data",
            "dev",
            "proc",
            "sys",
            "run",
            "boot",
            "mnt",
        ):
            mkdirs(d)
        mkdirs("tmp", 0o1777)
        mkdirs("root", 0o700)
        mkdirs("home/user", 0o750, 1000, 1000)
        mkdirs("var/mail", 0o2775, 0, 8)
        for name, target in (
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ):
            tree[name] = self.link(target)

        self._special_files(tree)
        budget = self.files - sum(1 for n in tree.values() if n.kind == FILE)
        self._bulk_files(tree, mkdirs, budget)
        return LayerModel("base", entries=tree)

    def _special_files(self, tree: Tree) -> None:
        tree["etc/passwd"] = self.file(
            b"root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n"
        )
        tree["etc/shadow"] = self.file(b"root:*:19000:0:99999:7:::\n", 0o640, gid=42)
        tree["etc/hostname"] = self.file(b"workload\n")
        tree["etc/motd"] = self.file(self.text(300))
        tree["etc/localtime"] = self.link("/usr/share/zoneinfo/Etc/UTC")
        tree["etc/mtab"] = self.link("../proc/self/mounts")  # dangling outside a container
        tree["etc/alternatives/editor"] = self.link("/usr/bin/vim.tiny")
        tree["usr/bin/vim.tiny"] = self.file(self.binary(60_000), 0o755)
        tree["usr/bin/nano"] = self.file(self.binary(40_000), 0o755)
        tree["usr/bin/passwd"] = self.file(self.binary(30_000), 0o4755)
        tree["usr/bin/wall"] = self.file(self.binary(20_000), 0o2755, gid=5)
        tree["usr/bin/ping"] = self.file(
            self.binary(25_000), 0o755, xattrs=((CAPABILITY_XATTR, CAP_NET_RAW_VALUE),)
        )
        tree["srv/data/report.txt"] = self.file(
            self.text(5000), xattrs=(("user.origin", b"workload"), ("user.rev", b"1"))
        )
        tree["home/user/.profile"] = self.file(self.text(200), uid=1000, gid=1000)

        perl = self.file(self.binary(120_000), 0o755)
        tree["usr/bin/perl"] = perl
        tree["usr/bin/perl5.36.0"] = perl
        utc = self.file(b"TZif2" + self.binary(111))
        for name in (
            "usr/share/zoneinfo/Etc/UTC",
            "usr/share/zoneinfo/UTC",
            "usr/share/zoneinfo/Zulu",
        ):
            tree[name] = utc

        head, tail = self.binary(4096), self.binary(4096)
        sparse = head + bytes(SPARSE_SIZE - 2 * 4096) + tail
        tree["var/lib/disk.img"] = self.file(sparse, 0o600)
        tree["run/initctl"] = Node(FIFO, mode=0o600, mtime=self.mtime())
        tree["var/lib/dpkg/status"] = self.file(self.text(40_000))

    def _bulk_files(self, tree: Tree, mkdirs: Callable[[str], None], budget: int) -> None:
        packages = [f"pkg{i:03d}" for i in range(max(1, budget // 12))]
        locales = ["de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "en_GB"]
        for loc in locales:
            mkdirs(f"usr/share/locale/{loc}/LC_MESSAGES")
        made = 0
        while made < budget:
            pkg = self.rng.choice(packages)
            where = self.rng.random()
            if where < 0.35:
                lib = f"usr/lib/x86_64-linux-gnu/lib{pkg}.so"
                real = f"{lib}.1.{self.rng.randrange(10)}.0"
                if real in tree:
                    continue
                tree[real] = self.file(self.binary(self.size()))
                tree[f"{lib}.1"] = self.link(real.rsplit("/", 1)[1])
            elif where < 0.55:
                mkdirs(f"usr/share/doc/{pkg}")
                name = self.rng.choice(["copyright", "changelog.gz", "README", "NEWS.gz"])
                path = f"usr/share/doc/{pkg}/{name}"
                if path in tree:
                    continue
                tree[path] = self.file(self.text(self.size() // 3 + 1))
            elif where < 0.70:
                sect = self.rng.choice(["man1", "man8"])
                tree[f"usr/share/man/{sect}/{pkg}-{made}.gz"] = self.file(
                    self.binary(self.size() // 4 + 1)
                )
            elif where < 0.80:
                loc = self.rng.choice(locales)
                path = f"usr/share/locale/{loc}/LC_MESSAGES/{pkg}.mo"
                if path in tree:
                    continue
                tree[path] = self.file(self.binary(self.size() // 2 + 1))
            elif where < 0.90:
                mod = f"usr/lib/python3/dist-packages/{pkg}"
                mkdirs(mod)
                tree[f"{mod}/mod{made}.py"] = self.file(self.text(self.size() // 2 + 1))
            elif where < 0.95:
                tree[f"var/lib/dpkg/info/{pkg}.list"] = self.file(self.text(400))
            else:
                tree[f"usr/bin/{pkg}-tool{made}"] = self.file(self.binary(self.size()), 0o755)
            made += 1
        mkdirs("etc/oldconf")
        for i in range(5):
            tree[f"etc/oldconf/part{i}.conf"] = self.file(self.text(700))
        for i in range(4):
            tree[f"etc/cron.daily/job{i}"] = self.file(self.text(300), 0o755)
        tree["opt/legacy/README"] = self.file(self.text(900))

    # -- the change layers

    def files_under(self, tree: Tree, prefix: str) -> list[str]:
        return sorted(p for p, n in tree.items() if n.kind == FILE and p.startswith(prefix))

    def install(self, below: Tree) -> LayerModel:
        layer = LayerModel("install")
        e = layer.entries
        e["usr/lib/newpkg"] = self.dir()
        e["usr/lib/newpkg/data"] = self.dir()
        for i in range(150):
            e[f"usr/lib/newpkg/data/f{i:03d}.bin"] = self.file(self.binary(self.size() // 2))
        e["usr/share/doc/newpkg"] = self.dir()
        e["usr/share/doc/newpkg/copyright"] = self.file(self.text(2000))
        e["var/lib/dpkg/status"] = self.file(below["var/lib/dpkg/status"].data + self.text(8000))
        docs = self.files_under(below, "usr/share/doc/")
        layer.deletes.extend(self.rng.sample(docs, 5))
        # A new name for an old file: OCI needs the old file in this layer too.
        nano = below["usr/bin/nano"]
        relinked = dataclasses.replace(nano, inode=self.inode())
        e["usr/bin/nano"] = relinked
        e["usr/bin/pico"] = relinked
        return layer

    def cleanup(self, below: Tree) -> LayerModel:
        layer = LayerModel("cleanup")
        e = layer.entries
        layer.deletes.append("usr/share/man")
        for loc in ("de", "fr", "ja"):
            layer.deletes.append(f"usr/share/locale/{loc}")

        mods = self.files_under(below, "usr/lib/python3/dist-packages/")
        src = self.rng.choice(mods)
        layer.deletes.append(src)
        e[src.rsplit("/", 1)[0] + "/renamed.py"] = dataclasses.replace(
            below[src], inode=self.inode()
        )
        layer.deletes.append("etc/oldconf")
        e["etc/newconf"] = below["etc/oldconf"]
        for i in range(5):
            e[f"etc/newconf/part{i}.conf"] = dataclasses.replace(
                below[f"etc/oldconf/part{i}.conf"], inode=self.inode()
            )

        e["etc/passwd"] = self.file(below["etc/passwd"].data + b"app:x:1001:1001::/srv:/bin/sh\n")
        report = below["srv/data/report.txt"]
        e["srv/data/report.txt"] = dataclasses.replace(
            report, xattrs=(("user.origin", b"workload"), ("user.rev", b"2")), inode=self.inode()
        )
        e["usr/bin/ping"] = dataclasses.replace(
            below["usr/bin/ping"], xattrs=(), inode=self.inode()
        )
        e["etc/hostname"] = dataclasses.replace(
            below["etc/hostname"], mode=0o600, inode=self.inode()
        )
        return layer

    def config(self, below: Tree) -> LayerModel:
        layer = LayerModel("config")
        e = layer.entries
        e["etc/cron.daily"] = self.dir()
        layer.opaque.append("etc/cron.daily")
        e["etc/cron.daily/logrotate"] = self.file(self.text(250), 0o755)

        e["opt/legacy"] = self.file(self.text(120))
        e["etc/motd"] = self.dir()
        e["etc/motd/10-welcome"] = self.file(self.text(80))
        e["etc/alternatives/editor"] = self.link("/usr/bin/nano")

        libs = self.files_under(below, "usr/lib/x86_64-linux-gnu/")
        big = max(libs, key=lambda p: (below[p].size, p))
        e[big] = dataclasses.replace(
            below[big], data=self.binary(below[big].size), mtime=self.mtime(), inode=self.inode()
        )
        pair = self.file(self.text(1500))
        e["srv/data/a.txt"] = pair
        e["srv/data/b.txt"] = pair
        return layer


@dataclasses.dataclass
class Workload:
    """The generated stack: layer models, their tars, and the expected final tree."""

    seed: int
    layers: list[LayerModel]

    @property
    def layer_ids(self) -> list[str]:
        return [f"{i}-{layer.name}" for i, layer in enumerate(self.layers)]

    def tars(self) -> Iterator[bytes]:
        """Each layer's OCI tar, base first (generated on demand: they are big)."""
        for layer in self.layers:
            yield layer_tar(layer)

    def final_tree(self) -> Tree:
        return stack_models(self.layers)

    def tree_after(self, count: int) -> Tree:
        """The tree of the first ``count`` layers stacked."""
        return stack_models(self.layers[:count])

    def total_file_bytes(self) -> int:
        """Bytes a reader gets by reading every regular file path of the final tree once."""
        return sum(n.size for n in self.final_tree().values() if n.kind == FILE)

    def file_count(self) -> int:
        return sum(1 for n in self.final_tree().values() if n.kind == FILE)


def build(seed: int = DEFAULT_SEED, files: int = DEFAULT_FILES) -> Workload:
    """Generate the workload for ``seed``; ``files`` sets the size of the base layer."""
    gen = _Generator(seed, files)
    base = gen.base()
    layers = [base]
    for step in (gen.install, gen.cleanup, gen.config):
        layers.append(step(stack_models(layers)))
    return Workload(seed, layers)


# --------------------------------------------------------------------------- OCI layout


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def write_oci_layout(workload: Workload, dest: Path, tag: str = "latest") -> Path:
    """Write the workload as an OCI image layout (uncompressed layers) at ``dest``.

    This lets tools that read images (umoci, ``graphdrivers import``) take the same stack.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers, diff_ids = [], []
    for tar in workload.tars():
        digest, size = _blob(blobs, tar)
        layers.append({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size})
        diff_ids.append(digest)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = _blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": csize,
        },
        "layers": layers,
    }
    mdigest, msize = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index, sort_keys=True))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return dest
