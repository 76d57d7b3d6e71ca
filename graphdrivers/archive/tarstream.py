"""A readable binary stream over an iterator of byte chunks.

:meth:`Driver.diff <graphdrivers.driver.Driver.diff>` hands its caller a file object while the tar
is still being generated: :class:`IteratorStream` pulls the next chunk from a generator only when
the reader asks for more, so a diff of any size uses a few chunks of memory. Closing the stream
closes the generator and then runs ``on_close`` (which releases the layers' mounts) exactly once,
whether the stream was read to the end, abandoned half way, or the generator raised.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


class IteratorStream(io.RawIOBase, BinaryIO):
    """``io.RawIOBase`` reading from ``iterator``; ``on_close`` runs once when closed."""

    def __init__(
        self, iterator: Iterator[bytes], on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self._iterator: Iterator[bytes] | None = iterator
        self._on_close = on_close
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        """Load the next non-empty chunk; False at the end of the iterator."""
        while not self._chunk:
            if self._iterator is None:
                return False
            try:
                self._chunk = memoryview(next(self._iterator))
            except StopIteration:
                self._iterator = None
                return False
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed IteratorStream")
        if not self._next_chunk():
            return 0

        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._chunk))
        out[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Return up to ``size`` bytes (all that is left for -1), without an extra copy."""
        if self.closed:
            raise ValueError("read from a closed IteratorStream")
        if size is None or size < 0:
            return self.readall()
        if size == 0 or not self._next_chunk():
            return b""

        piece = self._chunk[:size]
        self._chunk = self._chunk[size:]
        return piece.tobytes()

    def readall(self) -> bytes:
        parts = []
        while self._next_chunk():
            parts.append(self._chunk.tobytes())
            self._chunk = memoryview(b"")
        return b"".join(parts)

    def close(self) -> None:
        """Close the generator, then run ``on_close`` once, even if closing raised."""
        if self.closed:
            return
        iterator, self._iterator = self._iterator, None
        on_close, self._on_close = self._on_close, None
        self._chunk = memoryview(b"")
        try:
            close_iterator = getattr(iterator, "close", None)
            if close_iterator is not None:
                close_iterator()
        finally:
            try:
                if on_close is not None:
                    on_close()
            finally:
                super().close()
