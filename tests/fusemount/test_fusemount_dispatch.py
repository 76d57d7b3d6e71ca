"""The trimmed request loop (:mod:`fusemount.dispatch`) on real pipe fds, without a mount:
a queued request is taken without a scheduler pass, an idle fd still blocks, the loop yields
under sustained load, and the lock still excludes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from fusemount import dispatch


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.trio
async def test_queued_data_is_taken_without_a_scheduler_pass(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"x")
    ready = dispatch._Ready()
    with trio.testing.assert_no_checkpoints():
        for _ in range(dispatch.YIELD_EVERY):
            await ready.wait_readable(r)
    with trio.testing.assert_checkpoints():
        await ready.wait_readable(r)  # the next one passes through the scheduler


@pytest.mark.trio
async def test_an_idle_fd_blocks_until_written(pipe: tuple[int, int]) -> None:
    r, w = pipe
    ready = dispatch._Ready()
    woke: list[bytes] = []

    async def reader() -> None:
        await ready.wait_readable(r)
        woke.append(os.read(r, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        os.write(w, b"y")
    assert woke == [b"y"]


@pytest.mark.trio
async def test_fast_lock_excludes() -> None:
    lock = dispatch.FastLock()
    order: list[str] = []

    async def second() -> None:
        async with lock:
            order.append("second")

    async with trio.open_nursery() as nursery, lock:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        order.append("first")
    assert order == ["first", "second"]
