"""OCI images in and out of a driver: reading layouts and docker archives, digest checks,
import into vfs compared with ``umoci unpack``, and export -> import round trips.

The reference for what an imported image must look like is umoci's unpack of the same image:
every path with its type, mode, owner, size, content digest, link target, xattrs, device
numbers and hardlink group, as :mod:`graphdrivers.conformance.manifest` records them. Tests
that build their own images write the layout by hand (JSON and sha256 here), not with the
exporter under test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from graphdrivers import open_driver
from graphdrivers.conformance.manifest import diff_manifests, manifest
from graphdrivers.driver import Driver
from graphdrivers.errors import DriverError, InvalidArchive, InvalidOption, LayerExists
from graphdrivers.image import (
    Compression,
    Digest,
    ImageNotFound,
    LayerStream,
    TagNotFound,
    chain_ids,
    export_image,
    import_image,
    open_image,
    parse_reference,
)

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"
BUSYBOX = IMAGES / "busybox"
DEBIAN = IMAGES / "debian-minbase"
DOCKER_ARCHIVE = IMAGES / "busybox-docker-archive.tar"
UMOCI = shutil.which("umoci")

needs_images = pytest.mark.skipif(not BUSYBOX.is_dir(), reason=f"missing test images {IMAGES}")
needs_umoci = pytest.mark.skipif(UMOCI is None, reason="missing tool umoci (Debian package)")


def sha256(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------- building test images


def make_tar(entries: dict[str, bytes | str | None]) -> bytes:
    """A layer tar: bytes -> regular file, str -> symlink target, None -> directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in entries.items():
            info = tarfile.TarInfo(name)
            if value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size, info.mode = len(value), 0o644
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def compress(data: bytes, how: Compression) -> bytes:
    if how is Compression.GZIP:
        return gzip.compress(data, mtime=0)
    if how is Compression.ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {
    Compression.NONE: "application/vnd.oci.image.layer.v1.tar",
    Compression.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    Compression.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}


class Layout:
    """A hand-written OCI image layout for tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []

    def blob(self, data: bytes) -> str:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def json_blob(self, value: Any, media: str) -> dict[str, Any]:
        data = json.dumps(value).encode()
        return {"mediaType": media, "digest": self.blob(data), "size": len(data)}

    def manifest(
        self,
        tars: list[bytes],
        how: Compression = Compression.GZIP,
        diff_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        layers = []
        for tar in tars:
            blob = compress(tar, how)
            layers.append({"mediaType": MEDIA[how], "digest": self.blob(blob), "size": len(blob)})
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha256(t) for t in tars]},
        }
        return self.json_blob(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": self.json_blob(config, "application/vnd.oci.image.config.v1+json"),
                "layers": layers,
            },
            "application/vnd.oci.image.manifest.v1+json",
        )

    def tag(self, descriptor: dict[str, Any], name: str | None) -> None:
        entry = dict(descriptor)
        if name is not None:
            entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.index.append(entry)
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.index})
        )


BASE = make_tar({"etc": None, "etc/hello": b"hello\n", "bin": None, "bin/sh": "busybox"})
CHILD = make_tar({"etc": None, "etc/hello": b"changed\n", ".wh.bin": b"", "data": b"x" * 5000})


def read_all(stream: LayerStream) -> bytes:
    out = bytearray()
    while chunk := stream.read(4096):
        out += chunk
    return bytes(out)


# ----------------------------------------------------------------------- references and tags


@needs_images
def test_reference_splits_tags_only_off_paths_that_exist(tmp_path: Path) -> None:
    assert parse_reference(f"{BUSYBOX}:1") == (BUSYBOX, "1")
    assert parse_reference(str(BUSYBOX)) == (BUSYBOX, None)
    assert parse_reference(f"{DOCKER_ARCHIVE}:busybox:1") == (DOCKER_ARCHIVE, "busybox:1")

    odd = tmp_path / "dir:with:colons"
    odd.mkdir()
    assert parse_reference(str(odd)) == (odd, None)
    assert parse_reference(f"{odd}:v2") == (odd, "v2")
    with pytest.raises(ImageNotFound, match="does not exist"):
        parse_reference(str(tmp_path / "missing:1"))
    with pytest.raises(InvalidOption, match="names tag"):
        parse_reference(f"{BUSYBOX}:1", "2")


def test_tag_choice_and_errors_that_list_the_tags(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    first = layout.manifest([BASE])
    second = layout.manifest([BASE, CHILD])
    layout.tag(first, "v1")

    with open_image(layout.root) as image:  # one manifest: no tag needed
        assert len(image.layers) == 1
    layout.tag(second, "docker.io/library/thing:v2")

    with open_image(layout.root, tag="v1") as image:
        assert [b.digest for b in image.layers] == [sha256(gzip.compress(BASE, mtime=0))]
    with open_image(f"{layout.root}:v2") as image:  # a full reference matched by its tag
        assert len(image.layers) == 2
    with pytest.raises(TagNotFound) as err:
        open_image(layout.root, tag="v3")
    assert err.value.available == ["v1", "docker.io/library/thing:v2"]
    assert "no image tagged 'v3'" in str(err.value) and "v1, docker.io" in str(err.value)
    with pytest.raises(TagNotFound, match="holds 2 images; name one"):
        open_image(layout.root)


def test_nested_index_picks_this_hosts_platform(tmp_path: Path) -> None:
    from graphdrivers.image.oci import host_platform

    layout = Layout(tmp_path / "img")
    here_os, here_arch = host_platform().split("/")
    native = dict(layout.manifest([BASE]), platform={"os": here_os, "architecture": here_arch})
    foreign = dict(
        layout.manifest([BASE, CHILD]),
        platform={"os": "linux", "architecture": "s390x-not-this-host"},
    )
    nested = layout.json_blob(
        {"schemaVersion": 2, "manifests": [foreign, native]},
        "application/vnd.oci.image.index.v1+json",
    )
    layout.tag(nested, "multi")

    with open_image(layout.root, tag="multi") as image:
        assert len(image.layers) == 1
    with open_image(layout.root, tag="multi", platform="linux/s390x-not-this-host") as image:
        assert len(image.layers) == 2
    with pytest.raises(TagNotFound, match="no manifest for platform linux/mips"):
        open_image(layout.root, tag="multi", platform="linux/mips")


def test_not_an_image_and_bad_json_are_invalid_archives(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArchive, match="neither an OCI image layout"):
        open_image(tmp_path / "empty")

    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE]), "v1")
    manifest = next((layout.root / "blobs" / "sha256").iterdir())
    (layout.root / "index.json").write_text("{not json")
    with pytest.raises(InvalidArchive, match="not valid JSON"):
        open_image(layout.root)
    assert manifest.exists()


def test_a_manifest_blob_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.manifest([BASE])
    layout.tag(desc, "v1")
    path = layout.root / "blobs" / "sha256" / desc["digest"][7:]
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersiom"))
    with pytest.raises(InvalidArchive, match="does not match its digest"):
        open_image(layout.root)


# ----------------------------------------------------------------------- chain ids and streams


def test_chain_ids_follow_the_oci_formula() -> None:
    a, b, c = sha256(b"a"), sha256(b"b"), sha256(b"c")
    ab = sha256(f"{a} {b}".encode())
    assert chain_ids([a, b, c]) == [a, ab, sha256(f"{ab} {c}".encode())]
    assert chain_ids([]) == []


@needs_images
def test_layer_streams_of_the_shared_image_give_the_configs_diff_ids() -> None:
    with open_image(BUSYBOX, tag="1") as image:
        config = image.config
        for i, blob in enumerate(image.layers):
            stored = (BUSYBOX / blob.name).read_bytes()
            with image.open_layer(i) as stream:
                tar = read_all(stream)
            assert tar == gzip.decompress(stored)
            assert sha256(tar) == config["rootfs"]["diff_ids"][i]


@pytest.mark.parametrize("how", list(Compression))
def test_every_compression_streams_back_the_same_tar(tmp_path: Path, how: Compression) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE, CHILD], how), "v1")
    with open_image(layout.root) as image:
        assert [b.compression for b in image.layers] == [how, how]
        with image.open_layer(1) as stream:
            assert read_all(stream) == CHILD


def test_multi_member_gzip_is_one_stream(tmp_path: Path) -> None:
    raw = gzip.compress(CHILD[:3000], mtime=0) + gzip.compress(CHILD[3000:], mtime=0)
    stream = LayerStream(
        io.BytesIO(raw),
        name="two-members",
        compression=Compression.GZIP,
        digest=sha256(raw),
        size=len(raw),
        diff_id=sha256(CHILD),
    )
    assert read_all(stream) == CHILD


def stream_over(blob: bytes, how: Compression, tar: bytes, **kw: Any) -> LayerStream:
    return LayerStream(
        io.BytesIO(blob),
        name="blob-under-test",
        compression=how,
        digest=kw.get("digest", sha256(blob)),
        size=kw.get("size", len(blob)),
        diff_id=kw.get("diff_id", sha256(tar)),
    )


def test_a_wrong_blob_digest_fails_before_the_tar_reader_sees_its_end() -> None:
    blob = gzip.compress(CHILD, mtime=0)
    stream = stream_over(blob, Compression.GZIP, CHILD, digest=sha256(b"other"))

    # The tar is valid: only the digest check can stop a stream-mode tar reader, which stops
    # at the end-of-archive marker without reading to EOF.
    with (
        tarfile.open(fileobj=stream, mode="r|") as tar,
        pytest.raises(InvalidArchive, match="blob-under-test does not match its digest"),
    ):
        for _member in tar:
            pass


def test_a_wrong_diff_id_fails_before_the_end_too() -> None:
    stream = stream_over(CHILD, Compression.NONE, CHILD, diff_id=sha256(b"other"))
    with (
        tarfile.open(fileobj=stream, mode="r|") as tar,
        pytest.raises(InvalidArchive, match="does not match the diff id"),
    ):
        for _member in tar:
            pass


def test_size_truncation_and_corruption_are_invalid_archives() -> None:
    blob = gzip.compress(CHILD, mtime=0)
    with pytest.raises(InvalidArchive, match="descriptor says"):
        read_all(stream_over(blob, Compression.GZIP, CHILD, size=len(blob) - 1))
    with pytest.raises(InvalidArchive, match="its descriptor says"):
        read_all(stream_over(blob, Compression.GZIP, CHILD, size=len(blob) + 1))

    cut = blob[: len(blob) // 2]
    with pytest.raises(InvalidArchive, match="truncated"):
        read_all(stream_over(cut, Compression.GZIP, CHILD))

    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    with pytest.raises(InvalidArchive, match=r"not valid gzip|does not match the diff id"):
        read_all(stream_over(bytes(flipped), Compression.GZIP, CHILD))


def test_long_zero_runs_are_held_back_and_returned_whole() -> None:
    data = b"A" + bytes(3 << 20) + b"B" + bytes(10000)
    stream = stream_over(data, Compression.NONE, data)
    assert read_all(stream) == data
    gz = gzip.compress(data, mtime=0)
    assert read_all(stream_over(gz, Compression.GZIP, data)) == data


def test_highly_compressed_blobs_inflate_in_bounded_steps() -> None:
    # 40 MiB of zeros in a few KiB: the stream must neither hold the zeros nor inflate the
    # whole blob at once, whatever the compression.
    data = bytes(40 << 20)
    for how, blob in [
        (Compression.ZSTD, zstandard.ZstdCompressor().compress(data)),
        (Compression.GZIP, gzip.compress(data, mtime=0, compresslevel=1)),
    ]:
        stream = stream_over(blob, how, data)
        tracemalloc.start()
        try:
            total = 0
            while chunk := stream.read(1 << 16):
                total += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert total == len(data)
        assert peak < 24 << 20, f"{how}: {peak} bytes at the peak"


def test_gzip_zero_padding_after_the_last_member_is_accepted() -> None:
    blob = gzip.compress(CHILD, mtime=0) + bytes(100)
    assert read_all(stream_over(blob, Compression.GZIP, CHILD)) == CHILD


@needs_images
def test_docker_archive_tags_and_layers() -> None:
    with open_image(DOCKER_ARCHIVE) as image:
        assert len(image.layers) == 3
        assert all(b.compression is None and b.digest is None for b in image.layers)
        with image.open_layer(0) as stream:
            first = read_all(stream)
        assert sha256(first) == image.config["rootfs"]["diff_ids"][0]
    for tag in ("docker.io/library/busybox:1", "busybox:1", "1"):
        with open_image(DOCKER_ARCHIVE, tag=tag) as image:
            assert len(image.layers) == 3
    with pytest.raises(TagNotFound, match=r"no image tagged 'latest' \(tags: docker.io"):
        open_image(DOCKER_ARCHIVE, tag="latest")


def write_docker_archive(
    path: Path, layers: list[tuple[str, bytes]], tar_layers: list[bytes], *tags: list[str]
) -> None:
    """A docker save archive: ``layers`` are (member name, stored bytes) bottom to top, and
    each ``tags`` list makes one manifest.json entry of those layers."""
    diff_ids = [sha256(t) for t in tar_layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    entries = [
        {"Config": "config.json", "RepoTags": repo_tags, "Layers": [n for n, _ in layers]}
        for repo_tags in tags
    ]
    with tarfile.open(path, "w") as tar:
        members = [("manifest.json", json.dumps(entries).encode()), ("config.json", config)]
        for name, data in [*members, *layers]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_docker_archive_with_gzip_layers_and_linked_members(tmp_path: Path) -> None:
    # Old docker save: <id>/layer.tar members, here one a symlink to a shared file; gzip too.
    archive = tmp_path / "old.tar"
    gz = gzip.compress(CHILD, mtime=0)
    write_docker_archive(
        archive,
        [("shared.tar", BASE), ("b/layer.tar", gz)],
        [BASE, CHILD],
        ["example.com/team/app:v1"],
    )
    with tarfile.open(archive, "a") as tar:
        link = tarfile.TarInfo("a/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../shared.tar"
        tar.addfile(link)
    manifest = json.dumps(
        [
            {
                "Config": "config.json",
                "RepoTags": ["app:v1"],
                "Layers": ["a/layer.tar", "b/layer.tar"],
            }
        ]
    ).encode()
    with tarfile.open(archive, "a") as tar:  # a later member of one name wins in a tar
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))

    with open_image(f"{archive}:app:v1") as image:
        assert [b.name for b in image.layers] == ["a/layer.tar", "b/layer.tar"]
        with image.open_layer(0) as stream:
            assert read_all(stream) == BASE
        with image.open_layer(1) as stream:
            assert read_all(stream) == CHILD  # gzip told by its magic bytes


def test_docker_archive_blob_names_are_checked_and_tags_can_be_ambiguous(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "new.tar"
    gz = gzip.compress(BASE, mtime=0)
    name = f"blobs/sha256/{sha256(b'not the content')[7:]}"
    write_docker_archive(archive, [(name, gz)], [BASE], ["a.io/x/app:v1"], ["b.io/y/app:v1"])

    with pytest.raises(TagNotFound, match=r"has 2 images tagged 'app:v1'; name one by its full"):
        open_image(archive, tag="app:v1")
    with pytest.raises(TagNotFound, match="holds 2 images; name one with ARCHIVE:TAG"):
        open_image(archive)
    with open_image(archive, tag="a.io/x/app:v1") as image:
        assert image.layers[0].digest == sha256(b"not the content")
        with pytest.raises(InvalidArchive, match="does not match its digest"):
            read_all(image.open_layer(0))


def test_a_docker_archive_layer_in_an_unsupported_compression_is_refused(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "xz.tar"
    write_docker_archive(archive, [("l.tar", b"\xfd7zXZ\x00" + bytes(100))], [BASE], ["x:1"])
    with open_image(archive) as image, pytest.raises(InvalidArchive, match="xz-compressed"):
        image.open_layer(0)


def test_an_oci_layout_inside_a_tar_reads_like_the_directory(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE, CHILD]), "v1")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout.root, arcname=".")
    with open_image(f"{archive}:v1") as packed, open_image(f"{layout.root}:v1") as plain:
        assert packed.layers == plain.layers
        with packed.open_layer(1) as stream:
            assert read_all(stream) == CHILD


# ----------------------------------------------------------------------- trees and umoci


def assert_same_tree(got: Path, want: Path) -> None:
    """Compare two trees with the conformance suite's manifests; show what differs."""
    lines = diff_manifests(manifest(want), manifest(got))
    if lines:
        shown = "\n".join(lines[:60])
        pytest.fail(
            f"{len(lines)} entries of {got} differ from {want} (expected -> got):\n{shown}"
        )


def umoci_unpack(image_ref: str, bundle: Path) -> Path:
    assert UMOCI is not None
    run = subprocess.run(
        [UMOCI, "unpack", "--image", image_ref, str(bundle)], capture_output=True, text=True
    )
    assert run.returncode == 0, f"umoci unpack {image_ref}: {run.stderr}"
    return bundle / "rootfs"


# ----------------------------------------------------------------------- into and out of vfs


@pytest.fixture
def vfs(tmp_path: Path) -> Iterator[Driver]:
    driver = open_driver("vfs", tmp_path / "vfs-home")
    try:
        yield driver
    finally:
        driver.cleanup()


def imported_top_matches(driver: Driver, top: str, reference: Path) -> None:
    with driver.mounted(top, readonly=True) as root:
        assert_same_tree(root, reference)


@needs_images
@needs_umoci
def test_busybox_imports_as_umoci_unpacks_it(vfs: Driver, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    ids = import_image(
        vfs, f"{BUSYBOX}:1", progress=lambda done, total: seen.append((done, total))
    )
    with open_image(BUSYBOX, tag="1") as image:
        want_ids = [c[7:] for c in chain_ids(image.diff_ids or [])]
        total = sum(b.size or 0 for b in image.layers)
    assert ids == want_ids
    assert [vfs.parent(i) for i in ids] == [None, ids[0], ids[1]]
    assert seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))

    imported_top_matches(vfs, ids[-1], umoci_unpack(f"{BUSYBOX}:1", tmp_path / "bundle"))


@needs_images
@needs_umoci
def test_docker_archive_imports_like_the_oci_image_and_shares_its_layers(
    vfs: Driver, tmp_path: Path
) -> None:
    ids = import_image(vfs, DOCKER_ARCHIVE)
    imported_top_matches(vfs, ids[-1], umoci_unpack(f"{BUSYBOX}:1", tmp_path / "bundle"))

    # Same diff ids -> same chain ids: the OCI form of the image reuses every layer.
    before = sorted(vfs.list_layers())
    assert import_image(vfs, f"{BUSYBOX}:1") == ids
    assert sorted(vfs.list_layers()) == before


@pytest.fixture(scope="module")
def debian_import(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Driver, str]]:
    home = tmp_path_factory.mktemp("debian")
    driver = open_driver("vfs", home / "vfs-home")
    try:
        ids = import_image(driver, f"{DEBIAN}:bookworm")
        yield driver, ids[-1]
    finally:
        driver.cleanup()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
@needs_images
@needs_umoci
def test_debian_minbase_imports_as_umoci_unpacks_it(
    debian_import: tuple[Driver, str], tmp_path: Path
) -> None:
    driver, top = debian_import
    reference = umoci_unpack(f"{DEBIAN}:bookworm", tmp_path / "bundle")
    try:
        imported_top_matches(driver, top, reference)
    finally:
        shutil.rmtree(tmp_path / "bundle", ignore_errors=True)


@needs_images
@needs_umoci
@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_export_then_import_gives_the_same_trees(vfs: Driver, tmp_path: Path, how: str) -> None:
    ids = import_image(vfs, f"{BUSYBOX}:1")
    out = export_image(vfs, ids[-1], tmp_path / "out", tag="again", compress=how)  # type: ignore[arg-type]

    other = open_driver("vfs", tmp_path / "other-home")
    try:
        again = import_image(other, f"{out}:again")
        with open_image(out, tag="again") as image:
            assert again == [c[7:] for c in chain_ids(image.diff_ids or [])]
        for mine, theirs in zip(ids, again, strict=True):
            with vfs.mounted(mine) as a, other.mounted(theirs) as b:
                assert_same_tree(b, a)

        # Our diffs are deterministic: the re-imported chain exports to the same image.
        twice = export_image(other, again[-1], tmp_path / "twice", tag="again", compress=how)  # type: ignore[arg-type]
        assert (twice / "index.json").read_bytes() == (out / "index.json").read_bytes()
    finally:
        other.cleanup()

    if how != "zstd":  # umoci 0.4.7 predates zstd layers
        imported_top_matches(vfs, ids[-1], umoci_unpack(f"{out}:again", tmp_path / "bundle"))


def test_export_is_reproducible_and_adds_tags_to_a_layout(vfs: Driver, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE, CHILD]), "v1")
    ids = import_image(vfs, layout.root)

    one = export_image(vfs, ids[-1], tmp_path / "one")
    two = export_image(vfs, ids[-1], tmp_path / "two", tag="latest")
    assert (one / "index.json").read_bytes() == (two / "index.json").read_bytes()

    export_image(vfs, ids[0], one, tag="base")
    export_image(vfs, ids[0], one, tag="latest")  # replaces the old "latest"
    index = json.loads((one / "index.json").read_text())
    names = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]]
    assert sorted(names) == ["base", "latest"]
    with open_image(one, tag="latest") as image:
        assert len(image.layers) == 1

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(InvalidOption, match="not an OCI image layout"):
        export_image(vfs, ids[-1], tmp_path / "junk")
    with pytest.raises(InvalidOption, match="not a directory"):
        export_image(vfs, ids[-1], tmp_path / "junk" / "file")


def corrupt_layout(tmp_path: Path, swap_layer: int) -> Path:
    """A copy of busybox whose layer ``swap_layer`` blob holds other (valid) content."""
    copy = tmp_path / "corrupt"
    shutil.copytree(BUSYBOX, copy)
    os.chmod(copy / "blobs" / "sha256", 0o755)
    with open_image(copy, tag="1") as image:
        victim = copy / image.layers[swap_layer].name
    os.chmod(victim, 0o644)
    victim.write_bytes(gzip.compress(CHILD, mtime=0))
    return copy


@needs_images
@pytest.mark.parametrize("layer", [0, 2])
def test_a_blob_that_fails_its_digest_leaves_no_layer(
    vfs: Driver, tmp_path: Path, layer: int
) -> None:
    copy = corrupt_layout(tmp_path, layer)
    with pytest.raises(InvalidArchive, match=r"blobs/sha256/\w+ (is \d+ bytes|does not match)"):
        import_image(vfs, f"{copy}:1")
    assert vfs.list_layers() == []


def test_a_bad_digest_behind_trailing_bytes_is_caught_after_the_apply(
    vfs: Driver, tmp_path: Path
) -> None:
    # Non-zero bytes after the tar's end marker let the tar reader finish early; the importer
    # must still read on, find the mismatch and remove the layer.
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE], Compression.NONE), "v1")
    with open_image(layout.root) as image:
        blob = layout.root / image.layers[0].name
    blob.write_bytes(BASE + b"trailing junk after the end of the archive")
    with pytest.raises(InvalidArchive):
        import_image(vfs, layout.root)
    assert vfs.list_layers() == []


def test_explicit_layer_ids_and_a_clash(vfs: Driver, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE, CHILD]), "v1")
    assert import_image(vfs, layout.root, layer_ids=["base", "child"]) == ["base", "child"]
    assert vfs.parent("child") == "base"
    with vfs.mounted("child") as root:
        assert (root / "etc" / "hello").read_bytes() == b"changed\n"
        assert not (root / "bin").exists()
        assert (root / "data").stat().st_size == 5000

    with pytest.raises(LayerExists):
        import_image(vfs, layout.root, layer_ids=["other", "child"])
    assert not vfs.exists("other")
    with pytest.raises(InvalidOption, match="names 1 layers"):
        import_image(vfs, layout.root, layer_ids=["one"])


def test_a_layer_with_a_chain_id_but_another_parent_is_not_reused(
    vfs: Driver, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE, CHILD]), "v1")
    base_id, child_id = [c[7:] for c in chain_ids([sha256(BASE), sha256(CHILD)])]
    vfs.create("unrelated")
    vfs.create(child_id, "unrelated")
    with pytest.raises(DriverError, match="exists with parent 'unrelated'"):
        import_image(vfs, layout.root)
    assert not vfs.exists(base_id)  # the import created it, and took it away again


def test_unknown_tag_imports_nothing(vfs: Driver, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    layout.tag(layout.manifest([BASE]), "v1")
    with pytest.raises(TagNotFound, match=r"no image tagged 'nope' \(tags: v1\)"):
        import_image(vfs, f"{layout.root}:nope")
    assert vfs.list_layers() == []
