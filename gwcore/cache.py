"""The response cache: exact match on the gwnative cache key, memory LRU with a TTL.

How this works: the key is ``gwnative.cache_key`` of the raw request body (model,
messages, tools, sampling parameters; not ``stream``, ``user``, metadata: see
``gwnative/_cachekey_py.py``) in a namespace of the endpoint and the scope (the caller's
key id, or "shared" when ``cache.scope: shared``).  ``stream`` does not count, so a
streamed and a plain request share an entry: the value is always the plain JSON
response, and a streamed hit is replayed as a stream (``openai.completion_to_events``);
a streamed miss is assembled back into a plain response to be stored (text answers
only: a stream with tool calls is passed on but not stored).

``Cache-Control: no-cache`` on a request skips the lookup, ``no-store`` skips storing.
Only 200 answers are stored.  In memory: bounded by ``max_entries`` (least recently
used first out) and ``ttl_s``.  In Redis (``REDIS_URL``): every entry is stored with
``SET ... PX ttl_s``, values above ``cache.max_value_bytes`` (default 1 MiB) are not
stored, and the total is bounded by Redis's ``maxmemory`` with a policy that evicts keys
with a TTL (see ``gwcore/stores/redis.py``); ``max_entries`` does not apply.  While Redis
is down the cache is skipped (a miss, nothing stored), never an error.
"""
from __future__ import annotations

from collections import OrderedDict

import gwnative
from gwcore.config import CacheConfig
from gwcore.stores.redis import MAX_VALUE_BYTES, RedisCache, RedisConnection


class ResponseCache:
    """Memory LRU (``redis=None``, the default) or Redis (``RedisCache``).

    ``get``/``put`` are async because Redis may wait; the memory path never does.
    """

    def __init__(self, cfg: CacheConfig, redis: "RedisConnection | None" = None) -> None:
        self.enabled = cfg.enabled
        self.ttl_s = cfg.ttl_s
        self.max_entries = cfg.max_entries
        self.shared = cfg.scope == "shared"
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.store: RedisCache | None = None
        if redis is not None:
            self.store = RedisCache(
                redis, prefix=getattr(cfg, "redis_prefix", "gw:c:"),
                max_value_bytes=getattr(cfg, "max_value_bytes", MAX_VALUE_BYTES))

    def key(self, endpoint: str, raw_body: bytes, key_id: str) -> str:
        scope = "shared" if self.shared else key_id
        return gwnative.cache_key(raw_body, f"{endpoint}\x00{scope}")

    async def get(self, key: str, now: float) -> bytes | None:
        if self.store is not None:
            value = await self.store.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    async def put(self, key: str, value: bytes, now: float) -> None:
        if self.store is not None:
            await self.store.put(key, value, self.ttl_s)
            return
        self._entries[key] = (now + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def statistics(self) -> dict[str, int]:
        out = {"cache_entries": len(self._entries), "cache_hits_total": self.hits,
               "cache_misses_total": self.misses}
        if self.store is not None:
            out.update(self.store.statistics())
        return out


def directives(header: bytes | None) -> tuple[bool, bool]:
    """(skip lookup, skip store) from a request's Cache-Control."""
    if not header:
        return False, False
    parts = {p.strip().lower() for p in header.split(b",")}
    return b"no-cache" in parts, b"no-store" in parts
