"""The built-in workload: deterministic bytes, and layer tars that stack to the model's tree.

Two independent readers stack the tars: umoci (Debian's OCI tool, through an OCI layout the
workload writes) and our vfs driver through apply_diff. Both must give exactly the tree the
layer models say, down to modes, owners, xattrs, link targets and hardlink groups.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from graphdrivers import workload
from graphdrivers.workload import DIR, FIFO, FILE, SYMLINK, Tree

SMALL = 400  # files in the base for the quick tests
COMPARED_XATTRS = ("user.", "security.capability")

Manifest = dict[str, tuple[object, ...]]


def model_manifest(tree: Tree) -> tuple[Manifest, set[frozenset[str]]]:
    """What each path of a model tree must look like on disk, and its hardlink groups."""
    out: Manifest = {}
    groups: dict[int, set[str]] = {}
    for path, node in tree.items():
        xattrs = tuple(sorted(node.xattrs))
        if node.kind == FILE:
            digest = hashlib.sha256(node.data).hexdigest()
            out[path] = (FILE, node.mode, node.uid, node.gid, digest, node.mtime, xattrs)
            groups.setdefault(node.inode, set()).add(path)
        elif node.kind == DIR:
            out[path] = (DIR, node.mode, node.uid, node.gid, xattrs)
        elif node.kind == SYMLINK:
            out[path] = (SYMLINK, node.target, node.uid, node.gid)
        else:
            out[path] = (FIFO, node.mode, node.uid, node.gid)
    return out, {frozenset(g) for g in groups.values() if len(g) > 1}


def disk_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    names = os.listxattr(path, follow_symlinks=False)
    wanted = [n for n in names if n.startswith(COMPARED_XATTRS)]
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in wanted))


def disk_manifest(root: Path) -> tuple[Manifest, set[frozenset[str]]]:
    """The same view of a real tree (the root itself left out, as in the model)."""
    out: Manifest = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                xattrs = disk_xattrs(full)
                out[rel] = (FILE, perm, st.st_uid, st.st_gid, digest, int(st.st_mtime), xattrs)
                inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = (DIR, perm, st.st_uid, st.st_gid, disk_xattrs(full))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (SYMLINK, os.readlink(full), st.st_uid, st.st_gid)
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = (FIFO, perm, st.st_uid, st.st_gid)
            else:
                out[rel] = ("other", st.st_mode)
    return out, {frozenset(g) for g in inodes.values() if len(g) > 1}


def assert_same_tree(root: Path, tree: Tree) -> None:
    got, got_links = disk_manifest(root)
    want, want_links = model_manifest(tree)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    assert not missing and not extra and not wrong, (
        f"missing {missing[:10]}, extra {extra[:10]}, "
        f"wrong {[(p, want[p], got[p]) for p in wrong[:5]]}"
    )
    assert got_links == want_links


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes() -> None:
    first = list(workload.build(seed=7, files=SMALL).tars())
    second = list(workload.build(seed=7, files=SMALL).tars())
    assert [hashlib.sha256(t).hexdigest() for t in first] == [
        hashlib.sha256(t).hexdigest() for t in second
    ]
    other = list(workload.build(seed=8, files=SMALL).tars())
    assert first[0] != other[0]


def test_default_workload_size_and_shape() -> None:
    wl = workload.build()
    base = wl.layers[0].entries
    files = [n for n in base.values() if n.kind == FILE]
    total = sum(n.size for n in files)
    assert 2500 <= len(files) <= 3500
    assert 25 << 20 <= total <= 60 << 20
    assert len(wl.layers) == 4 and wl.layer_ids[0] == "0-base"

    sizes = sorted(n.size for n in files)
    assert sizes[len(sizes) // 2] < sizes[-1] // 100  # a long tail, not uniform sizes


def test_tars_carry_every_feature() -> None:
    wl = workload.build(files=SMALL)
    tars = []
    for data in wl.tars():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tars.append(tar.getmembers())
    base = {m.name.rstrip("/"): m for m in tars[0]}

    assert base["usr/bin/passwd"].mode == 0o4755
    assert base["usr/bin/wall"].mode == 0o2755 and base["usr/bin/wall"].gid == 5
    assert base["tmp"].mode == 0o1777 and base["tmp"].isdir()
    assert base["run/initctl"].isfifo()
    assert base["bin"].issym() and base["bin"].linkname == "usr/bin"
    assert base["usr/bin/perl5.36.0"].islnk() and base["usr/bin/perl5.36.0"].linkname == (
        "usr/bin/perl"
    )
    cap = base["usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == workload.CAP_NET_RAW_VALUE
    assert base["srv/data/report.txt"].pax_headers["SCHILY.xattr.user.rev"] == "1"
    assert base["var/lib/disk.img"].size == workload.SPARSE_SIZE

    names = [[m.name for m in t] for t in tars]
    assert "usr/share/.wh.man" in names[2]
    assert "etc/.wh.oldconf" in names[2] and "etc/newconf" in names[2]
    assert b"etc/newconf/\0" in list(wl.tars())[2]  # directory names end in "/"
    assert "etc/cron.daily/.wh..wh..opq" in names[3]
    assert names[3].index("etc/cron.daily") < names[3].index("etc/cron.daily/.wh..wh..opq")
    for listing in names:
        assert len(listing) == len(set(listing))  # no duplicate paths (OCI)


def test_models_stack_as_oci_says() -> None:
    wl = workload.build(files=SMALL)
    final = wl.final_tree()
    assert not any(p.startswith("usr/share/man") for p in final)
    assert not any(p.startswith("etc/oldconf") for p in final)
    assert sorted(p for p in final if p.startswith("etc/cron.daily/")) == [
        "etc/cron.daily/logrotate"
    ]
    assert final["opt/legacy"].kind == FILE and final["etc/motd"].kind == DIR
    assert final["usr/bin/nano"].inode == final["usr/bin/pico"].inode
    assert final["usr/bin/ping"].xattrs == ()
    assert wl.total_file_bytes() == sum(n.size for n in final.values() if n.kind == FILE)


# --------------------------------------------------------------------------- stacking for real


@pytest.mark.skipif(shutil.which("umoci") is None, reason="needs tool umoci (Debian umoci)")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to unpack owners and capabilities")
def test_umoci_unpacks_the_model_tree(tmp_path: Path) -> None:
    wl = workload.build(files=SMALL)
    layout = workload.write_oci_layout(wl, tmp_path / "image", tag="w")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:w", str(bundle)],
        check=True,
        capture_output=True,
    )
    assert_same_tree(bundle / "rootfs", wl.final_tree())


def test_vfs_apply_diff_stacks_to_the_model_tree(tmp_path: Path) -> None:
    from graphdrivers.registry import open_driver

    wl = workload.build(files=SMALL)
    driver = open_driver("vfs", tmp_path / "home")
    try:
        parent = None
        for count, (layer_id, tar) in enumerate(zip(wl.layer_ids, wl.tars(), strict=True), 1):
            driver.apply_diff(layer_id, parent, io.BytesIO(tar))
            with driver.mounted(layer_id) as root:
                assert_same_tree(root, wl.tree_after(count))
            parent = layer_id
    finally:
        driver.cleanup()
