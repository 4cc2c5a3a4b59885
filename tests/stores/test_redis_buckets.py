"""The Lua buckets against real Redis: gwnative's decisions, expiry, lease accounting."""
from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gwnative
from gwcore.stores.redis import Op, RedisBuckets, open_redis
from tests.support.redis import redis, redis_server  # noqa: F401  (fixtures)

CAP = st.sampled_from([1.0, 3.0, 10.0, 250.0, 1000.0])
RATE = st.sampled_from([0.0, 0.05, 1.0, 3.5, 100.0])
# Time only moves forward: Redis TIME does, and a deleted full bucket (the Lua side
# drops full buckets) only equals gwnative's kept one if `now` never goes back.
OPS = st.lists(st.tuples(st.sampled_from(["acquire", "refund"]),
                         st.floats(0.0, 5.0, allow_nan=False),        # time step
                         st.floats(-300.0, 300.0, allow_nan=False)),  # cost / amount
               min_size=1, max_size=25)


@settings(max_examples=25, deadline=None,
          # too_slow: a loaded CI machine slows the Redis round trips, not the logic.
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS, cap=CAP, rate=RATE, cap2=CAP)
async def test_lua_buckets_decide_like_gwnative_buckets(redis_server, ops, cap, rate, cap2):
    ref = gwnative.TokenBuckets(1.0, 0.0)
    async with open_redis(redis_server.url) as conn:
        buckets = RedisBuckets(conn, prefix=f"t:{uuid.uuid4().hex}:", clock="caller")
        now = 1000.0
        for i, (op, step, x) in enumerate(ops):
            now += step
            c = cap2 if i % 7 == 6 else cap  # a limit change now and then
            if op == "acquire":
                want = ref.acquire("b", abs(x), now, c, rate)
                got = await buckets.acquire("b", abs(x), now, c, rate)
                assert got.allowed == want.allowed
                assert got.astuple()[1:] == pytest.approx(want.astuple()[1:], rel=1e-12)
            else:
                want_t = ref.refund("b", x, now, c, rate)
                got_t = await buckets.refund("b", x, now, c, rate)
                assert got_t == pytest.approx(want_t, rel=1e-12, abs=1e-9)


async def test_buckets_expire_once_they_would_be_full_again(redis):
    async with open_redis(redis.url) as conn:
        buckets = RedisBuckets(conn, clock="caller")
        await buckets.acquire("k", 4.0, 100.0, 10.0, 2.0)   # 2 s to refill, +1 s slack
        ttl_ms = await conn.client.pttl("gw:rl:k")
        assert 2900 <= ttl_ms <= 3000
        # Refilled to full: the key is deleted at once (full == absent).
        assert await buckets.refund("k", 4.0, 100.5, 10.0, 2.0) == 10.0
        assert not await conn.client.exists(["gw:rl:k"])
        # A debit creates it, with a TTL long enough to pay the debt back.
        assert await buckets.refund("k", -25.0, 101.0, 10.0, 2.0) == -10.0
        assert 10_900 <= await conn.client.pttl("gw:rl:k") <= 11_000


async def test_tokens_in_live_leases_are_not_refilled_behind_them(redis):
    async with open_redis(redis.url) as conn:
        a = RedisBuckets(conn, clock="caller", worker_id="a", hold_s=2.0)
        b = RedisBuckets(conn, clock="caller", worker_id="b", hold_s=2.0)
        key = "gw:rl:x"
        (la,) = await a.run([Op("L", key, 1.0, 6.0, 10.0, 10.0, seq=1)], 0.0)
        assert (la.allowed, la.granted, la.tokens) == (True, 6.0, 4.0)
        # Half a second later the bucket would hold 9, but 6 are out on a's slice:
        # bucket + slices never exceed the capacity.
        (lb,) = await b.run([Op("L", key, 5.0, 8.0, 10.0, 10.0, seq=1)], 0.5)
        assert (lb.allowed, lb.granted, lb.tokens) == (False, 0.0, 4.0)
        (lb,) = await b.run([Op("L", key, 3.0, 8.0, 10.0, 10.0, seq=1)], 0.5)
        assert (lb.allowed, lb.granted, lb.tokens) == (True, 4.0, 0.0)
        (p,) = await a.run([Op("P", key, 0, 0, 10.0, 10.0)], 1.0)
        assert p.tokens == 0.0
        # a returns 2 unspent tokens: they come back, a's slice stops counting.
        (r,) = await a.run([Op("R", key, 2.0, 0, 10.0, 10.0, seq=1)], 1.0)
        assert r.tokens == 2.0
        (p,) = await a.run([Op("P", key, 0, 0, 10.0, 10.0)], 1.5)
        assert p.tokens == 6.0  # ceiling: 10 - b's 4
        # A lease that is never returned stops counting after hold_s (its worker died).
        (p,) = await a.run([Op("P", key, 0, 0, 10.0, 10.0)], 2.6)
        assert p.tokens == 10.0
        # A return with a stale sequence number credits the tokens but keeps the
        # worker's newer lease counted.
        await a.run([Op("L", key, 1.0, 5.0, 10.0, 10.0, seq=2)], 3.0)
        (r,) = await a.run([Op("R", key, 1.0, 0, 10.0, 10.0, seq=1)], 3.0)
        assert r.tokens == 5.0
        (p,) = await a.run([Op("P", key, 0, 0, 10.0, 10.0)], 4.0)
        assert p.tokens == 5.0


async def test_a_denied_lease_takes_nothing(redis):
    async with open_redis(redis.url) as conn:
        b = RedisBuckets(conn, clock="caller")
        key = "gw:rl:y"
        await b.run([Op("A", key, 8.0, 0, 10.0, 1.0)], 0.0)
        (r,) = await b.run([Op("L", key, 3.0, 5.0, 10.0, 1.0, seq=1)], 0.0)
        assert (r.allowed, r.granted, r.tokens) == (False, 0.0, 2.0)
        (r,) = await b.run([Op("L", key, 2.0, 5.0, 10.0, 1.0, seq=2)], 0.0)
        assert (r.allowed, r.granted, r.tokens) == (True, 2.0, 0.0)
