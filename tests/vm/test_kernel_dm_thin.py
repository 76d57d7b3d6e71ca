"""The kernel as the last word on our thin pool format.

Our engine writes a pool; Debian's cloud kernel, booted under qemu (see ``kernelvm``),
activates it with the real dm-thin target and prints what every thin device holds, block by
block. Then the kernel writes, snapshots, creates, deletes and sets the transaction id; after
it has removed the pool (which commits the metadata) our engine opens the images and must see
exactly what the kernel was told to write, with the kernel's sharing and times.

Every expected value comes from a byte model of the devices that both sides' writes are
applied to, not from either implementation. One boot; the test takes about 12-20 s here.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from pathlib import Path

import kernelvm
import pytest

from graphdrivers.thinpool import PoolStatus, ThinPool
from graphdrivers.thinpool.check import check_pool

BLOCK = 64 * 1024  # data block: 128 sectors
BLOCK_SECTORS = BLOCK // 512
THIN_BLOCKS = 64  # every thin device is 4 MiB
THIN_SECTORS = THIN_BLOCKS * BLOCK_SECTORS
META_BYTES = 64 * 1024 * 1024
DATA_BYTES = 256 * 1024 * 1024
DATA_SECTORS = DATA_BYTES // 512
LOW_WATER_MARK = 32768  # blocks, what containerd and moby send
TRANS_BEFORE, TRANS_AFTER, TRANS_LAST = 7, 8, 9

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- the model


@dataclasses.dataclass
class Device:
    content: bytearray
    mapped: set[int]


class Model:
    """Thin devices as bytes plus the set of virtual blocks each has mapped."""

    def __init__(self) -> None:
        self.devices: dict[int, Device] = {}

    def create(self, dev: int) -> None:
        self.devices[dev] = Device(bytearray(THIN_BLOCKS * BLOCK), set())

    def snapshot(self, dev: int, origin: int) -> None:
        o = self.devices[origin]
        self.devices[dev] = Device(bytearray(o.content), set(o.mapped))

    def delete(self, dev: int) -> None:
        del self.devices[dev]

    def write(self, dev: int, offset: int, data: bytes) -> None:
        d = self.devices[dev]
        d.content[offset : offset + len(data)] = data
        d.mapped.update(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))

    def block(self, dev: int, vblock: int) -> bytes:
        return bytes(self.devices[dev].content[vblock * BLOCK : (vblock + 1) * BLOCK])


@dataclasses.dataclass(frozen=True)
class KernelWrite:
    """One ``dd`` the VM runs: ``data`` (sent as /payload/<name>) at record ``seek`` of ``bs``."""

    name: str
    dev: int
    bs: int
    seek: int
    data: bytes

    @property
    def offset(self) -> int:
        return self.bs * self.seek

    @property
    def vblocks(self) -> set[int]:
        return set(range(self.offset // BLOCK, (self.offset + len(self.data) - 1) // BLOCK + 1))

    def command(self) -> str:
        return (
            f"dd if=/payload/{self.name} of=/dev/mapper/thin{self.dev} bs={self.bs} "
            f"seek={self.seek} count={len(self.data) // self.bs} conv=notrunc,fsync "
            "2>/dev/null"
        )


# ---------------------------------------------------------------------- the two halves


def engine_writes(pool: ThinPool, model: Model, rng: random.Random) -> None:
    """Our engine's part: full, partial and unaligned writes, holes, a snapshot, a delete."""

    def write(dev: int, offset: int, length: int) -> None:
        data = rng.randbytes(length)
        pool.device(dev).pwrite(data, offset)
        model.write(dev, offset, data)

    pool.create_thin(1)
    model.create(1)
    write(1, 0, BLOCK)  # block 0, whole
    write(1, BLOCK + 1000, 5000)  # inside block 1; the rest of it reads as zeros
    write(1, 3 * BLOCK, BLOCK)  # block 3; block 2 stays a hole
    write(1, 10 * BLOCK + 12345, 3 * BLOCK)  # blocks 10-13, unaligned at both ends
    write(1, THIN_BLOCKS * BLOCK - 100, 100)  # the last 100 bytes of the device
    pool.commit()

    pool.create_snap(2, 1)
    model.snapshot(2, 1)
    write(2, BLOCK + 2000, 3000)  # shared block 1: copied, then changed
    write(2, 12 * BLOCK, BLOCK)  # shared block 12: replaced whole
    write(2, 20 * BLOCK + 7, 10)  # a block the origin never had
    write(1, 500, 600)  # the origin breaks its own sharing of block 0

    pool.create_thin(3)  # written, committed, then deleted: its data blocks are freed
    model.create(3)
    write(3, 5 * BLOCK, 4 * BLOCK)
    pool.commit()
    pool.delete(3)
    model.delete(3)

    pool.set_transaction_id(0, TRANS_BEFORE)
    pool.commit()


def kernel_plan(rng: random.Random) -> dict[int, list[KernelWrite]]:
    """What the kernel writes to thin1 and thin4 after ``create_snap 4 1``, and to thin6.

    A write into a block the device has not mapped is always the whole block: the pool runs
    with ``skip_block_zeroing`` (as containerd and moby run it), so the kernel leaves the rest
    of a newly provisioned block as the data device had it, and a partial write there would
    read back whatever a deleted device left behind. Partial writes go to mapped blocks.
    """
    plan = [
        (1, 4096, 3 * BLOCK // 4096 + 2, 4096),  # 4 KiB inside block 3, shared with 2
        (1, BLOCK, 30, BLOCK),  # unmapped block 30, whole
        (4, 512, 10 * BLOCK_SECTORS + 5, 3 * 512),  # three sectors of block 10, shared
        (4, BLOCK, 40, BLOCK),  # unmapped block 40, whole
        (4, 512, 40 * BLOCK_SECTORS + 100, 512),  # one sector of its own block 40
        (6, BLOCK, 5, 2 * BLOCK),  # blocks 5-6 of a device the kernel created
    ]
    writes: dict[int, list[KernelWrite]] = {1: [], 4: [], 6: []}
    for i, (dev, bs, seek, length) in enumerate(plan):
        writes[dev].append(KernelWrite(f"w{i}.bin", dev, bs, seek, rng.randbytes(length)))
    return writes


def engine_writes_after_kernel(pool: ThinPool, model: Model, rng: random.Random) -> None:
    """Our engine again, over metadata the kernel laid out (its bitmaps, its shared nodes)."""

    def write(dev: int, offset: int, length: int) -> None:
        data = rng.randbytes(length)
        pool.device(dev).pwrite(data, offset)
        model.write(dev, offset, data)

    write(4, 3 * BLOCK + 100, 200)  # block 3: thin4 alone holds it now, but it is older
    write(4, 40 * BLOCK + 9000, 70)  # block 40: the kernel wrote it for thin4, in place
    pool.create_snap(7, 6)
    model.snapshot(7, 6)
    write(7, 5 * BLOCK + 1, 1)  # shared with 6: copied
    write(7, 50 * BLOCK, BLOCK)
    write(6, 100, 100)  # unmapped block 0 of 6: we provision it zero-filled
    pool.delete(1)
    model.delete(1)
    pool.set_transaction_id(TRANS_AFTER, TRANS_LAST)
    pool.commit()


# ---------------------------------------------------------------------- the VM scripts

SCRIPT_HELPERS = f"""\
wait_for() {{
    n=0
    while [ ! -b "$1" ]; do
        n=$((n + 1)); [ $n -le 200 ] || {{ echo "GD-ERROR no $1"; exit 1; }}; sleep 0.05
    done
}}
thin() {{ dmsetup create thin$1 --table "0 {THIN_SECTORS} thin /dev/mapper/pool $1"; }}
hashes() {{
    i=0
    while [ $i -lt {THIN_BLOCKS} ]; do
        h=$(dd if=/dev/mapper/thin$1 bs={BLOCK} skip=$i count=1 2>/dev/null | sha256sum)
        echo "GD-SHA $1 $i ${{h%% *}}"
        i=$((i + 1))
    done
}}
wait_for /dev/vda
wait_for /dev/vdb
dmsetup create pool --table \\
    "0 {DATA_SECTORS} thin-pool /dev/vda /dev/vdb {BLOCK_SECTORS} {LOW_WATER_MARK} 1 \\
skip_block_zeroing"
echo "GD-POOL-BEFORE $(dmsetup status pool)"
"""

SCRIPT_END = """\
echo "GD-POOL-AFTER $(dmsetup status pool)"
for d in $(dmsetup ls | grep -o '^thin[0-9]*'); do dmsetup remove $d; done
dmsetup remove pool
echo "GD-LEFT $(dmsetup ls | tr '\\n' ' ')"
"""


def first_script(writes: dict[int, list[KernelWrite]]) -> str:
    """Read thin1 and thin2; snapshot, write, create, delete, set the transaction id."""

    def dd(dev: int) -> str:
        return "\n".join(w.command() for w in writes[dev])

    return f"""{SCRIPT_HELPERS}
thin 1
thin 2
echo "GD-THIN-BEFORE 1 $(dmsetup status thin1)"
echo "GD-THIN-BEFORE 2 $(dmsetup status thin2)"
hashes 1
hashes 2
dmsetup suspend thin1
dmsetup message pool 0 "create_snap 4 1"
dmsetup resume thin1
thin 4
{dd(1)}
{dd(4)}
dmsetup message pool 0 "create_thin 6"
thin 6
{dd(6)}
dmsetup remove thin2
dmsetup message pool 0 "delete 2"
dmsetup message pool 0 "set_transaction_id {TRANS_BEFORE} {TRANS_AFTER}"
sync
echo "GD-THIN-AFTER 1 $(dmsetup status thin1)"
echo "GD-THIN-AFTER 4 $(dmsetup status thin4)"
echo "GD-THIN-AFTER 6 $(dmsetup status thin6)"
{SCRIPT_END}"""


def reading_script(devs: list[int]) -> str:
    """Activate the pool and the devices, print their status and block hashes, tear down."""
    lines = [SCRIPT_HELPERS]
    for dev in devs:
        lines += [
            f"thin {dev}",
            f'echo "GD-THIN-BEFORE {dev} $(dmsetup status thin{dev})"',
            f"hashes {dev}",
        ]
    return "\n".join([*lines, SCRIPT_END])


# ---------------------------------------------------------------------- reading the console


def marker(run: kernelvm.VMRun, name: str) -> list[list[str]]:
    """The words after ``name`` on each console line that starts with it."""
    return [ln.split()[1:] for ln in run.lines(name + " ")]


def console_of(run: kernelvm.VMRun) -> str:
    return f"--- VM console ({run.seconds:.1f} s) ---\n{run.console}"


def kernel_hashes(run: kernelvm.VMRun, devs: list[int]) -> dict[int, list[str]]:
    found = {dev: [""] * THIN_BLOCKS for dev in devs}
    for dev, vblock, sha in marker(run, "GD-SHA"):
        found[int(dev)][int(vblock)] = sha
    return found


def model_hashes(model: Model, devs: list[int]) -> dict[int, list[str]]:
    return {
        dev: [kernelvm.digest(model.block(dev, i)) for i in range(THIN_BLOCKS)] for dev in devs
    }


def differing(a: dict[int, list[str]], b: dict[int, list[str]]) -> list[tuple[int, int]]:
    """(device, block) pairs whose hashes differ."""
    return [(dev, i) for dev in sorted(a) for i in range(THIN_BLOCKS) if a[dev][i] != b[dev][i]]


def thin_status(model: Model, dev: int) -> list[str]:
    """``dmsetup status thinN``: start, length, target, mapped sectors, highest mapped sector."""
    mapped = model.devices[dev].mapped
    highest = str((max(mapped) + 1) * BLOCK_SECTORS - 1) if mapped else "-"
    return ["0", str(THIN_SECTORS), "thin", str(len(mapped) * BLOCK_SECTORS), highest]


def pool_status(status: PoolStatus) -> list[str]:
    """The first eight words of ``dmsetup status pool`` for a pool our engine reports on.

    Start, length, target, transaction id, used/total metadata blocks, used/total data
    blocks, held metadata root, mode. The kernel keeps min(4096, total/10) metadata blocks
    back and reports them as used.
    """
    total = status.total_metadata_blocks
    return [
        "0",
        str(DATA_SECTORS),
        "thin-pool",
        str(status.transaction_id),
        f"{status.used_metadata_blocks + min(4096, total // 10)}/{total}",
        f"{status.used_data_blocks}/{status.total_data_blocks}",
        "-",
        "rw",
    ]


def assert_clean(meta: Path, console: str) -> None:
    """thin_check and our own checker pass on the committed metadata."""
    if shutil.which("thin_check") is None:
        pytest.skip("needs thin_check (Debian package thin-provisioning-tools)")
    check = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr + console
    assert check_pool(meta) == [], console


def copy_images(src: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    dest.mkdir()
    out = []
    for path in src:
        subprocess.run(["cp", "--sparse=always", str(path), str(dest / path.name)], check=True)
        out.append(dest / path.name)
    return out[0], out[1]


# ---------------------------------------------------------------------- one round trip


@dataclasses.dataclass
class FirstRound:
    """Our pool as the kernel saw it, and the images after the kernel worked on them."""

    images: tuple[Path, Path]
    model: Model  # after the kernel's part
    ours: dict[int, list[str]]  # block hashes of devices 1 and 2, as our engine read them
    status: PoolStatus  # our engine's, before the VM
    maps: dict[int, dict[int, tuple[int, int]]]  # mappings of 1 and 2 before the VM
    writes: dict[int, list[KernelWrite]]
    run: kernelvm.VMRun
    rng: random.Random


@pytest.fixture(scope="module")
def boot_image() -> kernelvm.BootImage:
    try:
        return kernelvm.prepare()
    except kernelvm.Unavailable as exc:
        pytest.skip(f"kernel dm-thin VM: {exc}")


@pytest.fixture(scope="module")
def first_round(
    boot_image: kernelvm.BootImage, tmp_path_factory: pytest.TempPathFactory
) -> FirstRound:
    tmp = tmp_path_factory.mktemp("dm-thin-vm")
    meta, data = tmp / "meta.img", tmp / "data.img"
    for path, size in ((meta, META_BYTES), (data, DATA_BYTES)):
        with open(path, "wb") as f:
            f.truncate(size)
    rng = random.Random(20261204)
    model = Model()

    with ThinPool.format(meta, data, data_block_size=BLOCK_SECTORS) as pool:
        engine_writes(pool, model, rng)
        ours = {
            dev: [
                kernelvm.digest(pool.device(dev).pread(BLOCK, i * BLOCK))
                for i in range(THIN_BLOCKS)
            ]
            for dev in (1, 2)
        }
        status = pool.status()
        maps = {dev: {v: (b, t) for v, b, t in pool.mappings(dev)} for dev in (1, 2)}
    assert differing(ours, model_hashes(model, [1, 2])) == [], "our engine misreads itself"
    assert_clean(meta, "(before the VM)")

    writes = kernel_plan(rng)
    payload = {w.name: w.data for ws in writes.values() for w in ws}
    run = kernelvm.boot(boot_image, [meta, data], first_script(writes), payload)

    after = Model()  # the kernel's part, applied to a copy of the model
    after.devices = {
        d: Device(bytearray(v.content), set(v.mapped)) for d, v in model.devices.items()
    }
    after.snapshot(4, 1)
    for dev in (1, 4):
        for w in writes[dev]:
            after.write(dev, w.offset, w.data)
    after.create(6)
    for w in writes[6]:
        after.write(6, w.offset, w.data)
    after.delete(2)
    return FirstRound((meta, data), after, ours, status, maps, writes, run, rng)


# ---------------------------------------------------------------------- the tests


def test_kernel_reads_what_our_engine_wrote(first_round: FirstRound) -> None:
    run, console = first_round.run, console_of(first_round.run)
    assert run.exit_status == 0, console
    assert run.lines("GD-ERROR") == [], console

    seen = kernel_hashes(run, [1, 2])
    differ = differing(seen, first_round.ours)
    assert differ == [], f"the kernel reads other bytes in (device, block) {differ}\n{console}"

    (before,) = marker(run, "GD-POOL-BEFORE")
    assert before[:8] == pool_status(first_round.status), console
    assert before[-2] == "-", f"the kernel set needs_check\n{console}"

    assert marker(run, "GD-THIN-BEFORE") == [
        [
            str(d),
            "0",
            str(THIN_SECTORS),
            "thin",
            str(len(first_round.maps[d]) * BLOCK_SECTORS),
            str((max(first_round.maps[d]) + 1) * BLOCK_SECTORS - 1),
        ]
        for d in (1, 2)
    ], console


def test_our_engine_reads_what_the_kernel_wrote(first_round: FirstRound) -> None:
    run, console = first_round.run, console_of(first_round.run)
    assert run.exit_status == 0, console
    model, writes = first_round.model, first_round.writes
    meta, data = first_round.images

    assert marker(run, "GD-THIN-AFTER") == [
        [str(dev), *thin_status(model, dev)] for dev in (1, 4, 6)
    ], console
    (after,) = marker(run, "GD-POOL-AFTER")
    assert marker(run, "GD-LEFT") == [["No", "devices", "found"]], console

    assert_clean(meta, console)
    with ThinPool.open(meta, data) as pool:
        assert pool.sb.trans_id == TRANS_AFTER
        assert pool.sb.time == 2  # our create_snap made it 1, the kernel's made it 2
        assert pool.status().used_data_blocks == int(after[5].split("/")[0]), console

        devices = pool.devices()
        assert sorted(devices) == [1, 4, 6]
        maps = {dev: {v: (b, t) for v, b, t in pool.mappings(dev)} for dev in (1, 4, 6)}
        for dev in (1, 4, 6):
            blocks = [
                i for i in range(THIN_BLOCKS) if pool.read_block(dev, i) != model.block(dev, i)
            ]
            assert blocks == [], f"device {dev} differs from the model in blocks {blocks}"
            assert sorted(maps[dev]) == sorted(model.devices[dev].mapped), f"device {dev}"
            assert devices[dev].mapped_blocks == len(model.devices[dev].mapped)

        # Sharing and times by the kernel's rules: the blocks the kernel wrote carry its time
        # 2; the rest of thin1 is as our engine left it; thin4 shares every block of thin1
        # that neither of them wrote.
        by_kernel = {dev: set().union(*(w.vblocks for w in writes[dev])) for dev in (1, 4, 6)}
        for dev in (1, 4, 6):
            assert {v for v, (_, t) in maps[dev].items() if t == 2} == by_kernel[dev], dev
        before = first_round.maps[1]
        kept = set(before) - by_kernel[1]
        assert {v: maps[1][v] for v in kept} == {v: before[v] for v in kept}
        shared = kept - by_kernel[4]
        assert {v: maps[4][v] for v in shared} == {v: maps[1][v] for v in shared}

        # Details as create_snap and create_thin record them (kernel dm-thin-metadata.c).
        assert (devices[1].creation_time, devices[1].snapshotted_time) == (0, 2)
        assert (devices[4].creation_time, devices[4].snapshotted_time) == (2, 2)
        assert (devices[6].creation_time, devices[6].snapshotted_time) == (2, 2)
        assert [devices[d].transaction_id for d in (1, 4, 6)] == [0, TRANS_BEFORE, TRANS_BEFORE]


def test_kernel_reads_our_writes_over_its_metadata(
    first_round: FirstRound, boot_image: kernelvm.BootImage, tmp_path: Path
) -> None:
    assert first_round.run.exit_status == 0, console_of(first_round.run)
    meta, data = copy_images(first_round.images, tmp_path / "again")
    model = Model()
    model.devices = {
        d: Device(bytearray(v.content), set(v.mapped))
        for d, v in first_round.model.devices.items()
    }
    rng = random.Random(first_round.rng.random())

    with ThinPool.open(meta, data) as pool:
        engine_writes_after_kernel(pool, model, rng)
        status = pool.status()
    devs = [4, 6, 7]
    assert_clean(meta, "(our engine over the kernel's metadata, before the second VM)")

    run = kernelvm.boot(boot_image, [meta, data], reading_script(devs))
    console = console_of(run)
    assert run.exit_status == 0, console
    assert run.lines("GD-ERROR") == [], console
    (before,) = marker(run, "GD-POOL-BEFORE")
    assert before[:8] == pool_status(status), console
    assert marker(run, "GD-THIN-BEFORE") == [
        [str(dev), *thin_status(model, dev)] for dev in devs
    ], console
    differ = differing(kernel_hashes(run, devs), model_hashes(model, devs))
    assert differ == [], f"the kernel reads other bytes in (device, block) {differ}\n{console}"
    assert marker(run, "GD-LEFT") == [["No", "devices", "found"]], console
    assert_clean(meta, console)
