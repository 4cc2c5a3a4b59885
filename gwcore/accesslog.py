"""One JSON line per request (orjson), written off the hot path.

Lines are appended to an in-memory buffer and written out by ``run`` ``flush_s``
after the first line of a batch (and at shutdown), so a request never waits on the
log's file descriptor, and an idle gateway does not wake up for its log.  The buffer
is bounded: past ``max_buffer_bytes`` a line is dropped and counted (``dropped``),
because a stalled log reader must not grow memory without end.
Records carry key names and ids, never a key.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, BinaryIO

import orjson
import trio


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None, *, enabled: bool = True,
                 flush_s: float = 0.2, max_buffer_bytes: int = 8 * 1024 * 1024) -> None:
        self.stream = stream if stream is not None else sys.stderr.buffer
        self.enabled = enabled
        self.flush_s = flush_s
        self.max_buffer_bytes = max_buffer_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self.written = 0
        self.dropped = 0
        self._wakeup: trio.Event | None = None  # set by record while run() sleeps

    def record(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fields["ts"] = round(time.time(), 3)
        line = orjson.dumps(fields) + b"\n"
        if self._size + len(line) > self.max_buffer_bytes:
            self.dropped += 1
            return
        self._lines.append(line)
        self._size += len(line)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def flush(self) -> None:
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        self.written += data.count(b"\n")
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += data.count(b"\n")  # stderr closed: nothing left to tell

    async def run(self) -> None:
        try:
            while True:
                if not self._lines:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                await trio.sleep(self.flush_s)
                self.flush()
        finally:
            self._wakeup = None
            self.flush()


def event(message: str, **fields: Any) -> None:
    """A one-off structured line (startup, shutdown) written at once to stderr."""
    fields = {"ts": round(time.time(), 3), "level": "info", "msg": message, **fields}
    os.write(2, orjson.dumps(fields) + b"\n")
