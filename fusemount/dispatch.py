"""How pyfuse3's request loop waits for the next request: trio, minus the idle passes.

pyfuse3 runs each worker task as: take a ``trio.Lock`` (a pass through trio's scheduler even
when nobody holds it), ``trio.lowlevel.wait_readable`` on ``/dev/fuse`` (a second pass, with
an ``epoll_ctl`` and an ``epoll_wait``), read one request, run its handler. Measured on these
machines the two passes cost about 30 µs a request: more than the handlers themselves (5-14 µs
for open, read, release, lookup).

Our handlers never await, so a single worker task serves every request as fast as many would
(:data:`MAX_TASKS`; more tasks only add a task spawned and ended per request) and the lock is
never contended. pyfuse3 looks these names up on its module global ``trio`` at call time (its
own asyncio mode swaps that global the same way), so :func:`install` hands it a module that is
trio except for two names:

- ``Lock``: taken at once when free, without a scheduler pass;
- ``lowlevel.wait_readable``: polls the fd without blocking first, and returns at once when a
  request is already queued (the kernel sends RELEASE and FORGET without the caller waiting,
  and read-ahead comes in bursts). After :data:`YIELD_EVERY` such returns in a row it passes
  through the scheduler anyway, so the signal watcher still runs under sustained load.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

MAX_TASKS = 1
YIELD_EVERY = 64


class FastLock:
    """A ``trio.Lock`` that skips the scheduler pass when it is free."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class _Ready:
    """``wait_readable`` that returns at once for an fd with data queued."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self._in_a_row = 0

    def _queued(self, fd: int) -> bool:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    async def wait_readable(self, fd: int) -> None:
        if self._in_a_row < YIELD_EVERY and self._queued(fd):
            self._in_a_row += 1
            return
        self._in_a_row = 0
        await trio.lowlevel.wait_readable(fd)


class _Forward(types.ModuleType):
    """A module whose missing attributes are read from another module."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name)
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def install() -> None:
    """Make pyfuse3's request loop use :class:`FastLock` and the polling ``wait_readable``."""
    lowlevel = _Forward("fusemount.dispatch.lowlevel", trio.lowlevel)
    lowlevel.wait_readable = _Ready().wait_readable  # type: ignore[attr-defined]
    shim = _Forward("fusemount.dispatch.trio", trio)
    shim.Lock = FastLock  # type: ignore[attr-defined]
    shim.lowlevel = lowlevel  # type: ignore[attr-defined]
    setattr(pyfuse3, "trio", shim)  # noqa: B010 (pyfuse3 declares no such name)
