"""RateLimiter over Redis: global limits through per-worker leases, the worst-case bound,
round trips per request, settling, and Redis outages (fail open / fail closed)."""
from __future__ import annotations

import subprocess
import sys
import time
from bisect import bisect_right
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from gwcore.auth import KeyInfo
from gwcore.errors import RateLimited
from gwcore.ratelimit import FALLBACK, LEASED, LimitsUnavailable, RateLimiter
from gwcore.stores.redis import RedisBuckets, open_redis
from gwcore.wire import Usage
from tests.support.procs import ROOT
from tests.support.redis import limits_config, redis, redis_server  # noqa: F401  (fixtures)

KEY = KeyInfo(id="key_a", name="a")


def max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max((bisect_right(times, t + window_s) - i for i, t in enumerate(times)), default=0)


def assert_within_bound(times: list[float], cap: float, rate: float) -> None:
    """The documented bound while Redis is up: over any T, at most cap + rate * T."""
    for window_s in (0.1, 0.25, 0.5, 1.0, 2.0):
        got = max_in_window(times, window_s)
        assert got <= cap + rate * window_s + 1, (window_s, got)


@asynccontextmanager
async def workers(url: str, cfg: Any, n: int) -> AsyncIterator[list[RateLimiter]]:
    """n simulated worker processes: each its own connection, leases and flusher."""
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(open_redis(url)) for _ in range(n)]
        async with trio.open_nursery() as nursery:
            out = [RateLimiter(cfg, redis=conn) for conn in conns]
            for limiter in out:
                nursery.start_soon(limiter.run)
            yield out
            nursery.cancel_scope.cancel()


async def hammer(limiter: RateLimiter, until: float, times: list[float],
                 trips: list[int], key: KeyInfo = KEY) -> None:
    while time.monotonic() < until:
        try:
            adm = await limiter.admit(key, "m", {}, 0, trio.current_time())
        except RateLimited:
            await trio.sleep(0.003)
            continue
        times.append(time.monotonic())
        trips.append(adm.round_trips)
        await trio.sleep(0)


async def test_workers_sharing_a_limit_never_exceed_it(redis):
    cap, window_s = 40, 4.0          # 10 per second
    rate = cap / window_s
    cfg = limits_config(cap, window_s, instances=4)
    times: list[float] = []
    trips: list[int] = []
    async with workers(redis.url, cfg, 4) as limiters:
        until = time.monotonic() + 2.5
        async with trio.open_nursery() as clients:
            for limiter in limiters:
                for _ in range(8):
                    clients.start_soon(hammer, limiter, until, times, trips)
    assert_within_bound(times, cap, rate)
    # ... and the limit is used, not starved: the burst plus most of the refill.
    assert len(times) >= cap + rate * 2.5 * 0.6
    assert max(trips) <= 1


async def test_one_round_trip_at_most_per_request_and_far_fewer_on_average(redis):
    cfg = limits_config(10_000_000, 60.0, instances=4)
    times: list[float] = []
    trips: list[int] = []
    async with workers(redis.url, cfg, 4) as limiters:
        until = time.monotonic() + 0.6
        async with trio.open_nursery() as clients:
            for limiter in limiters:
                for _ in range(8):                     # c = 32
                    clients.start_soon(hammer, limiter, until, times, trips)
        stats = [lim.statistics() for lim in limiters]
    assert max(trips) <= 1
    assert sum(trips) / len(trips) < 0.01, (sum(trips), len(trips))
    # Counted on the connections too: round trips on the admit path are the leases.
    assert sum(s["limiter_lease_calls_total"] for s in stats) == sum(trips)
    assert sum(s["limiter_local_takes_total"] for s in stats) >= len(times) - sum(trips)


async def test_settle_gives_back_the_unused_reservation_and_charges_the_excess(redis):
    cfg = limits_config(None, tokens_per_minute=600)   # 10 tokens/s refill
    body = {"max_tokens": 200}                         # reserves 0 // 4 + 200
    async with workers(redis.url, cfg, 2) as (a, b):
        adms = [await a.admit(KEY, "m", body, 0, trio.current_time()) for _ in range(3)]
        with pytest.raises(RateLimited):
            await b.admit(KEY, "m", body, 0, trio.current_time())
        for adm in adms:
            a.settle(adm, Usage(prompt_tokens=5, completion_tokens=15), trio.current_time(),
                     failed=False)
        # The flusher sends the 3 * 180 back within flush_s; b forgets its denial (a
        # local 429 without a round trip) after DENIAL_CACHE_S.
        await trio.sleep(0.2)
        peek = RedisBuckets(a.redis, clock="redis")  # type: ignore[arg-type]
        (r,) = await peek.run([_peek("gw:rl:t:k:key_a")])
        assert 540 <= r.tokens <= 560
        # Another worker sees them: two more reservations fit, a third does not.
        await b.admit(KEY, "m", body, 0, trio.current_time())
        last = await b.admit(KEY, "m", body, 0, trio.current_time())
        with pytest.raises(RateLimited):
            await b.admit(KEY, "m", body, 0, trio.current_time())
        # Real usage beyond the reservation is charged afterwards.
        b.settle(last, Usage(prompt_tokens=100, completion_tokens=400), trio.current_time(),
                 failed=False)
        await trio.sleep(0.2)
        (r,) = await peek.run([_peek("gw:rl:t:k:key_a")])
        assert r.tokens < 0  # 145 left - 300 more than reserved


def _peek(key: str) -> Any:
    from gwcore.stores.redis import Op
    return Op("P", key, 0.0, 0.0, 600.0, 10.0)


async def test_redis_down_fails_open_to_local_shares_and_back(redis):
    cap, window_s, n = 40, 400.0, 4         # hardly refills during the test
    cfg = limits_config(cap, window_s, instances=n)
    async with open_redis(redis.url, probe_s=0.1) as conn, trio.open_nursery() as nursery:
        limiter = RateLimiter(cfg, redis=conn)
        nursery.start_soon(limiter.run)
        adm = await limiter.admit(KEY, "m", {}, 0, trio.current_time())
        assert adm.via == LEASED
        redis.stop()
        admitted = {LEASED: 0, FALLBACK: 0}
        with pytest.raises(RateLimited):
            for _ in range(100):
                adm = await limiter.admit(KEY, "m", {}, 0, trio.current_time())
                admitted[adm.via] += 1
        # What is left of the slice (taken from Redis already) is used, then this
        # worker's share of the limit: 1/N.
        assert admitted[LEASED] <= 3
        assert admitted[FALLBACK] == cap // n
        stats = limiter.statistics()
        assert stats["limiter_global"] == 0 and stats["redis_up"] == 0
        assert stats["limiter_fallback_switches_total"] == 1
        assert stats["redis_switches_total"] == 1
        assert limiter.ready_state() == "degraded"
        redis.start()
        with trio.fail_after(5):
            while not conn.up:
                await trio.sleep(0.05)
        adm = await limiter.admit(KEY, "m", {}, 0, trio.current_time())
        assert adm.via == LEASED                # global again (a fresh, full bucket)
        assert limiter.ready_state() == "ok"
        assert limiter.statistics()["redis_switches_total"] == 2
        nursery.cancel_scope.cancel()


async def test_redis_down_fails_closed_with_a_503(redis):
    cfg = limits_config(40, 60.0, redis_fail="closed")
    async with open_redis(redis.url, probe_s=0.1) as conn, trio.open_nursery() as nursery:
        limiter = RateLimiter(cfg, redis=conn)
        nursery.start_soon(limiter.run)
        await limiter.admit(KEY, "m", {}, 0, trio.current_time())
        redis.stop()
        leased = 0
        with pytest.raises(LimitsUnavailable):
            for _ in range(10):   # what is left of the slice, then 503
                await limiter.admit(KEY, "m", {}, 0, trio.current_time())
                leased += 1
        assert leased <= 3
        with pytest.raises(LimitsUnavailable) as err:
            await limiter.admit(KEY, "m", {}, 0, trio.current_time())
        assert err.value.status == 503 and err.value.code == "upstream_unavailable"
        # Unlimited callers (the master key) are not affected.
        await limiter.admit(KeyInfo(id="master", name="master", is_master=True), "m", {}, 0,
                            trio.current_time())
        assert limiter.statistics()["limiter_unavailable_total"] == 2
        assert limiter.ready_state() == "down"
        redis.start()
        with trio.fail_after(5):
            while not conn.up:
                await trio.sleep(0.05)
        assert (await limiter.admit(KEY, "m", {}, 0, trio.current_time())).via == LEASED
        nursery.cancel_scope.cancel()


async def test_separate_processes_share_the_limit(redis):
    cap, window_s, procs = 30, 3.0, 3       # 10 per second
    start_at = time.monotonic() + 2.0       # after every process has imported
    args = [sys.executable, "-m", "tests.support.redis", "worker", redis.url, "key_p",
            str(cap), str(window_s), str(procs), "1.5", "4", repr(start_at)]
    running = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in range(procs)]
    outs = [await trio.to_thread.run_sync(p.communicate, None, 30) for p in running]
    times: list[float] = []
    for p, (out, _) in zip(running, outs):
        assert p.returncode == 0
        lines = out.decode().split()
        assert lines[0] == "trips"
        times += [float(x) for x in lines[2:]]
    assert min(times) >= start_at
    assert_within_bound(times, cap, cap / window_s)
    assert len(times) >= cap
