"""Records, a running writer, and waiting on statistics, for the store tests."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from gwcore.ports import AuditRecord

# A fixed "now" with microseconds; timestamps are made as the stores read them back
# (integer microseconds / 1e6), so they survive the round trip exactly.
# Noon of today (UTC), so a test's records never straddle midnight.
NOW_US = (int(time.time()) // 86_400 * 86_400 + 43_200) * 1_000_000 + 123_456
NOW = NOW_US / 1e6
DAY = 86_400.0


def make_record(i: int, **kw: Any) -> AuditRecord:
    base: dict[str, Any] = dict(
        ts=(NOW_US + i * 1000) / 1e6, request_id=f"req-{i:06d}", key_id="key_aaaaaaaaaaaaaaaa",
        user="alice", client_ip="10.0.0.7", endpoint="/v1/chat/completions",
        model="chat-default", provider="openai", upstream_model="gpt-4o-mini", status=200,
        prompt_tokens=10 + i % 7, completion_tokens=5 + i % 3, cached_tokens=i % 2,
        reasoning_tokens=0, cost_pico=1_000_000 * (i + 1), latency_ms=(123_456 + i * 1000) / 1000,
        ttft_ms=45.5, cache_hit=False, error_code=None)
    base.update(kw)
    return AuditRecord(**base)


@asynccontextmanager
async def running(store: Any) -> AsyncIterator[trio.Nursery]:
    """The store's writer task for the body of the block, then its shutdown flush."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    with trio.move_on_after(timeout_s):
        while not check():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")
