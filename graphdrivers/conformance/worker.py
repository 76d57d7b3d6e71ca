"""A separate process that opens the driver under test and runs one operation on its home.

The crash and multi-process checks start this module with ``python -m``, kill it in the middle
of an operation or let two of them race, and then look at the home from the test process. The
driver is made from its registry spec (a built-in name or ``module:Factory``), which is why
those checks need a spec rather than a callable. One JSON argument says what to do::

    {"spec": "vfs", "home": "/tmp/.../home", "options": {}, "op": "create",
     "layer": "child", "parent": "base"}

Operations: ``create`` and ``remove`` of ``layer``; ``apply`` of the tar read from stdin into
``layer`` on ``parent``; ``churn``, which creates, fills, checks and removes ``count`` layers
named ``<layer>-<n>`` on ``parent`` and prints one line per layer. Exit status 0 means the
operation finished; anything else is a failure the parent reports with this process's stderr.

With ``"stop_at": STATE`` the worker stops itself (SIGSTOP) as soon as the record of
``layer`` has been written in STATE: the crash checks use it for drivers whose operation is too
quick to catch by watching from outside, so the kill still lands in the middle of it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _churn(driver: Any, job: dict[str, Any]) -> None:
    for n in range(int(job["count"])):
        lid = f"{job['layer']}-{n}"
        driver.create(lid, job.get("parent"))
        with driver.mounted(lid) as root:
            (Path(root) / "who").write_text(lid)
        with driver.mounted(lid, readonly=True) as root:
            got = (Path(root) / "who").read_text()
            if got != lid:
                raise RuntimeError(f"layer {lid} reads {got!r}")
        if n % 2:
            driver.remove(lid)
        print(lid, flush=True)


def _stop_at(layer_id: str, state: str) -> None:
    """Make this process stop itself once ``layer_id``'s record is written in ``state``."""
    from graphdrivers.store import LayerRecord, LayerStore

    write = LayerStore.put

    def put_then_stop(store: LayerStore, record: LayerRecord) -> None:
        write(store, record)
        if record.id == layer_id and record.state.value == state:
            os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs us here

    LayerStore.put = put_then_stop  # type: ignore[method-assign, assignment]


def run_job(job: dict[str, Any]) -> None:
    """Open the driver and run the operation ``job`` names."""
    from graphdrivers.registry import resolve_factory

    if job.get("stop_at"):
        _stop_at(job["layer"], job["stop_at"])

    driver = resolve_factory(job["spec"])(Path(job["home"]), dict(job.get("options") or {}))
    try:
        op = job["op"]
        print(f"started {op}", flush=True)
        if op == "create":
            driver.create(job["layer"], job.get("parent"))
        elif op == "remove":
            driver.remove(job["layer"])
        elif op == "apply":
            driver.apply_diff(job["layer"], job.get("parent"), sys.stdin.buffer)
        elif op == "churn":
            _churn(driver, job)
        else:
            raise ValueError(f"unknown operation {op!r}")
    finally:
        driver.cleanup()
    print("done", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run_job(json.loads(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
