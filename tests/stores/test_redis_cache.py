"""ResponseCache on real Redis: hits, misses, TTL expiry, size bound, skipped while down."""
from __future__ import annotations

import trio

from gwcore.cache import ResponseCache
from gwcore.config import CacheConfig
from gwcore.stores.redis import RedisCache, open_redis
from tests.support.redis import redis, redis_server  # noqa: F401  (fixtures)


async def test_hit_miss_and_ttl_expiry(redis):
    async with open_redis(redis.url) as conn:
        cache = ResponseCache(CacheConfig(enabled=True, ttl_s=0.3), redis=conn)
        key = cache.key("chat", b'{"model": "m", "messages": []}', "key_a")
        assert await cache.get(key, 0.0) is None
        await cache.put(key, b'{"id": "x"}', 0.0)
        assert await cache.get(key, 0.0) == b'{"id": "x"}'
        # Another worker (another connection) sees the same entry.
        async with open_redis(redis.url) as other:
            assert await ResponseCache(CacheConfig(enabled=True), redis=other).get(key, 0.0) \
                == b'{"id": "x"}'
        assert 0 < await conn.client.pttl("gw:c:" + key) <= 300
        await trio.sleep(0.4)
        assert await cache.get(key, 0.0) is None
        assert cache.statistics()["cache_hits_total"] == 1
        assert cache.statistics()["cache_misses_total"] == 2


async def test_values_above_the_size_bound_are_not_stored(redis):
    async with open_redis(redis.url) as conn:
        store = RedisCache(conn, max_value_bytes=100)
        await store.put("big", b"x" * 101, 60)
        await store.put("small", b"x" * 100, 60)
        assert await store.get("big") is None
        assert await store.get("small") == b"x" * 100
        assert store.statistics()["cache_redis_too_large_total"] == 1


async def test_the_cache_is_skipped_while_redis_is_down(redis):
    async with open_redis(redis.url, probe_s=0.1) as conn:
        cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60), redis=conn)
        await cache.put("k", b"v", 0.0)
        redis.stop()
        assert await cache.get("k", 0.0) is None       # a miss, not an error
        await cache.put("k2", b"v2", 0.0)              # not stored, not an error
        assert conn.state == "down"
        assert cache.statistics()["cache_redis_skipped_total"] >= 2
        redis.start()                                  # empty: the entries are gone
        with trio.fail_after(5):
            while conn.state != "ok":
                await trio.sleep(0.05)
        await cache.put("k3", b"v3", 0.0)
        assert await cache.get("k3", 0.0) == b"v3"


async def test_the_memory_cache_is_unchanged_by_default():
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=10, max_entries=2))
    for i in range(3):
        await cache.put(f"k{i}", b"v%d" % i, 0.0)
    assert await cache.get("k0", 1.0) is None          # least recently used: out
    assert await cache.get("k2", 1.0) == b"v2"
    assert await cache.get("k2", 10.0) is None         # expired
