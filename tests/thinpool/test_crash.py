"""kill -9 of a process writing to a pool leaves it at its last committed transaction."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from graphdrivers.thinpool import ThinPool
from graphdrivers.thinpool.check import check_pool

BLOCK = 64 * 1024

# Step i: write 3 new blocks to device (i % 3), snapshot every 5th step, delete every 7th,
# then record i as the transaction id. Each step only adds mappings, so the state at step i
# is fully known without replaying data that may or may not have reached the disk.
WORKER = textwrap.dedent(
    """
    import sys
    from graphdrivers.thinpool import ThinPool

    meta, data, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pool = ThinPool.open(meta, data)
    for i in range(start, start + 10_000):
        for k in range(3):
            pool.device(0).pwrite(bytes([i % 251]) * 4096, (i * 3 + k) * 65536)
        if i % 5 == 0:
            pool.create_snap(1000 + i, 0)
        if i % 7 == 0 and 1000 + i - 5 in pool.devices():
            pool.delete(1000 + i - 5)
        pool.set_transaction_id(i - 1, i)
        print(i, flush=True)
    """
)


def expected_devices(step: int) -> set[int]:
    devices = {0}
    for i in range(1, step + 1):
        if i % 5 == 0:
            devices.add(1000 + i)
        if i % 7 == 0:
            devices.discard(1000 + i - 5)
    return devices


def possible_devices(step: int) -> list[set[int]]:
    """The device sets after step ``step`` and after each message of the next step.

    Every message commits on its own, as the kernel's do, so a kill inside a step can leave
    its snapshot made (or its delete done) before the transaction id moves.
    """
    states = [expected_devices(step)]
    nxt = step + 1
    if nxt % 5 == 0:
        states.append(states[-1] | {1000 + nxt})
    if nxt % 7 == 0:
        states.append(states[-1] - {1000 + nxt - 5})
    return states


def test_kill_during_writes_snapshots_and_deletes(tmp_path: Path) -> None:
    meta, data = tmp_path / "metadata", tmp_path / "data"
    with open(meta, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    with open(data, "wb") as f:
        f.truncate(40000 * BLOCK)
    with ThinPool.format(meta, data) as pool:
        pool.create_thin(0)

    rng = random.Random(3)
    step = 0
    for _round in range(6):
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(meta), str(data), str(step + 1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        stop_after = rng.randrange(5, 40)
        seen = step
        for line in worker.stdout:
            seen = int(line)
            if seen - step >= stop_after:
                break
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()

        assert subprocess.run(["thin_check", str(meta)], capture_output=True).returncode == 0
        assert check_pool(meta) == []
        with ThinPool.open(meta, data) as pool:
            step = pool.status().transaction_id
            # The kill may land after a commit but before the worker printed it.
            assert step in (seen, seen + 1)
            assert set(pool.devices()) in possible_devices(step)
            mapped = {v for v, _b, _t in pool.mappings(0)}
            assert mapped == {i * 3 + k for i in range(1, step + 1) for k in range(3)}
            for i in (1, step):
                assert pool.device(0).pread(4096, i * 3 * BLOCK) == bytes([i % 251]) * 4096
