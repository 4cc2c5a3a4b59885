"""Redis for rate limits and the response cache: a connection with a health state, global
token buckets in Lua, a per-worker leasing layer over them, and the cache store.

How this works
--------------
``RedisConnection`` wraps one coredis client (``REDIS_URL``) with short timeouts and no
retries of its own.  Its state is ``ok`` or ``down``; any failed command switches it to
``down`` (logged once, through ``accesslog.event``) and starts a probe that PINGs every
``probe_s`` until Redis answers, then switches back to ``ok`` (logged once).  While it is
``down`` no command is sent: callers get ``RedisDown`` at once and use their fallback
(local 1/N buckets for limits, a miss for the cache), so an outage costs one timeout per
worker, not one per request.

``RedisBuckets`` keeps the global token buckets, one Redis hash per bucket, changed only
by ``BUCKETS_LUA`` (one EVALSHA for any number of operations on any number of buckets,
atomic).  The arithmetic is ``gwnative/_buckets_py.py``'s, in the same order, on the
same IEEE doubles (numbers are stored as ``%.17g`` strings, which round-trip exactly), so
with the caller's clock its decisions are those of ``gwnative.TokenBuckets``
(``tests/stores/test_redis_buckets.py`` checks it with hypothesis).

Clock: the gateway uses Redis ``TIME`` (``clock="redis"``): every worker and instance
refills a bucket from the same clock, so skew between gateway hosts changes nothing.
``clock="caller"`` (the ``now`` given to each call) exists for the parity tests; one
bucket must never see both.  If the Redis host's clock is stepped back, buckets stop
refilling until it catches up (never refill backwards); stepped forward by ``d``, a
bucket gains ``d * rate`` tokens at most up to its capacity, once.

Keys expire: a bucket is written back with a TTL of the time it needs to refill to full
(+1 s), and deleted outright when it is full and nobody holds a lease on it, because a
full bucket and an absent one decide the same (the gateway passes the limits on every
call).  Idle buckets therefore cost no memory.

Leases (``LeasedBuckets``, one per worker process)
--------------------------------------------------
A request must not pay a Redis round trip per bucket, so each worker takes a *slice* of
a global bucket (operation ``L``: at least ``need``, up to ``want`` tokens, in one
EVALSHA together with everything else pending) and admits later requests from it with
no round trip.  Redis records each live slice in the bucket's hash (``o:<worker>`` =
amount, expiry, sequence number) and refills the bucket only up to ``capacity - (tokens
held in live slices)``.  So tokens in the bucket plus tokens in all slices never exceed
the capacity: a slice is spent, as far as every other worker can tell, the moment it is
taken.  A slice lives ``lease_s`` (2 s) on the worker, counted from *before* the request
was sent; Redis forgets it ``LEASE_HOLD_MARGIN_S`` later (the worker died, or the return
was lost).  On expiry, or when a worker renews (the remainder goes back in the same
EVALSHA as the new lease, operation ``R``), the unspent tokens return to the bucket.

Slice sizes adapt: ``want = need + min(Lmax, recent local rate * LEASE_HORIZON_S)``, the
first slice of a key ``INITIAL_LEASE_COSTS`` costs, and
``Lmax = min(capacity * LEASE_MAX_FRACTION, capacity / instances)`` so a small limit is
never hoarded by one worker.  Concurrent requests that need a slice of the same bucket
wait for the one lease in flight instead of sending their own.  A request pays at most
one round trip of its own (all its buckets in one call), and none while its slices last.

A denial from Redis is remembered for up to DENIAL_CACHE_S (or the retry time, if
shorter): during it, requests of that cost or more on this worker are denied without a
round trip, so a burst of 429s costs Redis nothing.

Settling (real usage against the reservation) is local: a debit is paid from the live
slice first, the rest and every credit are queued and sent with the next lease or by
``run`` within ``flush_s`` (off the hot path, one EVALSHA for all keys).

How far over a limit the cluster can go
---------------------------------------
While Redis is up: a bucket's tokens plus all live slices never exceed its capacity
(above), so over any interval of length T the cluster admits at most
``capacity + rate * T`` (+ credits settled back, exactly like one in-process bucket): it
never exceeds the limit.  The exceptions, all bounded:

- Real usage above a reservation (tokens): as in-process, it is charged after the call
  (the bucket may go down to ``-capacity``), but reaches Redis up to ``flush_s`` later
  (or with the worker's next lease).
- Credits (settled reservations, returned slices) are capped at the capacity minus the
  live slices, like refunds of one bucket; they are sent at most once: a credit whose
  call failed is dropped (conservative), a debit is sent again (may count twice:
  conservative).
- A slice used for ``lease_s`` on the worker and held ``lease_s + LEASE_HOLD_MARGIN_S``
  by Redis: only if the Redis host's clock jumps forward by more than the margin (or a
  worker's monotonic clock runs that much slower) can a slice be spent after Redis
  stopped counting it: at most the live slices, ``instances * Lmax``, once.
- Redis clock steps (above): at most one extra capacity per step forward.

While Redis is down (``limits.redis_fail: open``, the default) every worker limits on its
own, with buckets of ``capacity / N`` refilled at ``rate / N``, ``N`` = ``limits.instances``
when set, else the number of live workers last seen in Redis (heartbeats), else
``server.workers``.  With N right, the cluster admits at most ``capacity + rate * T``
over T; with M workers actually running, ``M / N`` of that.  The local buckets start full,
so the window in which Redis goes down can see the global admissions before the switch
plus one more ``capacity``; likewise when Redis comes back empty (restarted), its buckets
start full.  Slices held when Redis went down are dropped (not spent).  With
``limits.redis_fail: closed`` limited requests get a 503 instead.

Cache: ``RedisCache`` stores the bytes with ``SET key value PX ttl``: every entry has a
TTL, so a Redis with ``maxmemory`` and ``maxmemory-policy volatile-ttl`` or
``volatile-lru`` (or ``allkeys-lru`` on a Redis used only for the cache) bounds the total
size; values above ``max_value_bytes`` are not stored.  Limits keep their buckets in the
same Redis: prefer a policy that evicts the cache's longer TTLs first (``volatile-ttl``),
or a separate database/instance for the cache, since an evicted bucket is a full one.
While Redis is down the cache is skipped: a miss, nothing stored, never an error.

Redis Cluster: one EVALSHA touches several buckets, so use a single primary (with
replicas) or put the prefix in a hash tag, e.g. ``{gw}:rl:``.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import coredis.exceptions
import coredis.retry
import trio

import gwnative
from gwcore.accesslog import event

# 250 ms: a same-datacenter Redis answers in well under a millisecond; a quarter second
# without an answer is an outage, and one request per worker pays it before the switch.
TIMEOUT_S = 0.25
PROBE_S = 0.5

# Leasing (see the module docstring).
LEASE_S = 2.0               # a slice is usable this long on the worker
LEASE_HOLD_MARGIN_S = 1.0   # ... and counted by Redis this much longer
LEASE_HORIZON_S = 1.0       # a slice covers this long of the worker's recent demand
DENIAL_CACHE_S = 0.1        # a denial from Redis is repeated locally at most this long
SLICE_FORGET_S = 30.0       # a key's demand estimate is kept this long after its slice
LEASE_MAX_FRACTION = 0.25   # and at most this part of the capacity
INITIAL_LEASE_COSTS = 4     # first slice of a key: this many request costs
FLUSH_S = 0.05              # settle credits/debits reach Redis within this
HEARTBEAT_S = 2.0           # live workers are counted for the 1/N fallback

_INF = float("inf")


class RedisDown(Exception):
    """Redis did not answer (or is known to be down): use the fallback."""


def mask_url(url: str) -> str:
    return re.sub(r"//([^@/]*)@", "//***@", url)


class RedisConnection:
    """A coredis client with a health state (``ok``/``down``) and a reconnect probe.

    Use ``open_redis(url)``; ``call`` runs one command and turns every failure into
    ``RedisDown`` (switching the state to ``down``).
    """

    def __init__(self, url: str, *, timeout_s: float = TIMEOUT_S, probe_s: float = PROBE_S,
                 name: str = "redis") -> None:
        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.client: Any = coredis.Redis.from_url(
            url, stream_timeout=timeout_s, connect_timeout=timeout_s,
            retry_policy=coredis.retry.NoRetryPolicy())
        pool = self.client.connection_pool
        pool.connection_class = _closing_buffers(pool.connection_class)
        self.up = True
        self._down = trio.Event()
        self.round_trips = 0
        self.errors = 0
        self.switches = 0
        self.last_error = ""

    @property
    def state(self) -> str:
        return "ok" if self.up else "down"

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await ``fn(*args, **kwargs)`` (a coredis command); RedisDown on any failure."""
        if not self.up:
            raise RedisDown(self.last_error)
        self.round_trips += 1
        try:
            # coredis has its own timeouts; this one also covers a stuck pool.
            with trio.fail_after(self.timeout_s * 2):
                return await fn(*args, **kwargs)
        except (coredis.exceptions.RedisError, OSError, trio.TooSlowError,
                trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
            self.errors += 1
            self.mark_down(exc)
            raise RedisDown(str(exc) or type(exc).__name__) from exc

    def mark_down(self, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}")
        self.last_error = reason
        if not self.up:
            return
        self.up = False
        self.switches += 1
        self._down.set()
        event("redis_down", level="warning", redis=mask_url(self.url), error=reason,
              fallback="limits: local 1/N buckets or 503 (limits.redis_fail); cache skipped")

    def _mark_up(self) -> None:
        if self.up:
            return
        self.up = True
        self.switches += 1
        self._down = trio.Event()
        event("redis_up", redis=mask_url(self.url))

    async def ping(self) -> bool:
        try:
            with trio.fail_after(self.timeout_s * 2):
                await self.client.ping()
            return True
        except (coredis.exceptions.RedisError, OSError, trio.TooSlowError,
                trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False

    async def _probe(self) -> None:
        while True:
            await self._down.wait()
            while not self.up:
                await trio.sleep(self.probe_s)
                self.round_trips += 1
                if await self.ping():
                    self._mark_up()

    def statistics(self) -> dict[str, Any]:
        return {"redis_up": int(self.up), "redis_round_trips_total": self.round_trips,
                "redis_errors_total": self.errors, "redis_switches_total": self.switches}


_BUFFERS = ("_push_message_buffer_in", "_push_message_buffer_out",
            "_streamed_message_buffer_in", "_streamed_message_buffer_out",
            "_write_buffer_in", "_write_buffer_out")


def _closing_buffers(base: type) -> type:
    """coredis 6.9 creates a connection's anyio memory streams in ``__init__`` and closes
    them only once the socket is up: each failed connect (every command while Redis is
    down) leaves six unclosed streams, a ResourceWarning each when collected.  Close them
    when the connect fails."""
    class Connection(base):  # type: ignore[misc, valid-type]
        async def _connect(self) -> Any:
            try:
                return await super()._connect()
            except BaseException:
                for name in _BUFFERS:
                    stream = getattr(self, name, None)
                    if stream is not None:
                        stream.close()
                raise

    Connection.__name__ = Connection.__qualname__ = f"Closing{base.__name__}"
    return Connection


@asynccontextmanager
async def open_redis(url: str, *, timeout_s: float = TIMEOUT_S,
                     probe_s: float = PROBE_S) -> AsyncIterator[RedisConnection]:
    """Connect (an unreachable Redis starts ``down``, it is not an error) and run the
    reconnect probe until the block exits."""
    conn = RedisConnection(url, timeout_s=timeout_s, probe_s=probe_s)
    async with conn.client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._probe)
            conn.round_trips += 1
            if await conn.ping():
                event("redis_connected", redis=mask_url(url))
            else:
                conn.mark_down(conn.last_error)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def maybe_open_redis(url: str | None) -> AsyncIterator[RedisConnection | None]:
    """``open_redis(url)``, or None when no ``REDIS_URL`` is configured (in-process)."""
    if not url:
        yield None
        return
    async with open_redis(url) as conn:
        yield conn


# ---------------------------------------------------------------------------------------
# Global buckets

# ARGV: now ("" = Redis TIME), worker id, lease hold seconds, then 6 per key:
# op, x, y, seq, capacity, refill_per_s.  Ops (x, y):
#   A acquire(cost)   F refund(amount)   L lease(need, want)   R return(remainder) of
#   lease `seq`   U the unspent part of lease `seq` is now x (the rest was spent)
#   P peek   M heartbeat of this worker in the members zset (x = ttl s).
# Returns 5 per key: allowed (0/1), tokens, granted, capacity, rate (numbers as %.17g).
BUCKETS_LUA = r"""
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local wid = ARGV[2]
local hold = tonumber(ARGV[3])
local own = 'o:' .. wid
local function num(x) return string.format('%.17g', x) end
local out = {}
for i = 1, #KEYS do
  local b = 3 + (i - 1) * 6
  local op = ARGV[b + 1]
  local key = KEYS[i]
  if op == 'M' then
    local ttl = tonumber(ARGV[b + 2])
    redis.call('ZADD', key, now + ttl, wid)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
    local n = redis.call('ZCARD', key)
    out[#out + 1] = 1; out[#out + 1] = num(n); out[#out + 1] = '0'
    out[#out + 1] = '0'; out[#out + 1] = '0'
  else
    local x = tonumber(ARGV[b + 2])
    local y = tonumber(ARGV[b + 3])
    local seq = ARGV[b + 4]
    local capacity = tonumber(ARGV[b + 5])
    local refill = tonumber(ARGV[b + 6])
    local h = redis.call('HGETALL', key)
    local tokens, last, cap, rate
    local owed = 0
    local mine = nil
    local gone = {}
    for j = 1, #h, 2 do
      local f, v = h[j], h[j + 1]
      if f == 't' then tokens = tonumber(v)
      elseif f == 'l' then last = tonumber(v)
      elseif f == 'c' then cap = tonumber(v)
      elseif f == 'r' then rate = tonumber(v)
      elseif string.sub(f, 1, 2) == 'o:' then
        local amt, exp, s = string.match(v, '^(%S+) (%S+) (%S+)$')
        amt = tonumber(amt); exp = tonumber(exp)
        if exp <= now then
          gone[#gone + 1] = f
        else
          owed = owed + amt
          if f == own then mine = {amt, s, exp} end
        end
      end
    end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
    local existed = tokens ~= nil
    if not existed then
      cap = capacity
      rate = refill
      tokens = cap - owed
      last = now
    else
      local elapsed = now - last
      if elapsed > 0 then
        tokens = tokens + elapsed * rate
        if tokens > cap - owed then tokens = cap - owed end
        last = now
      end
      if capacity >= 0 and capacity ~= cap then
        if tokens >= cap or tokens > capacity then tokens = capacity end
        cap = capacity
      end
      if refill >= 0 then rate = refill end
    end
    local allowed = 1
    local granted = 0
    local write = true
    if op == 'A' then
      if tokens >= x then tokens = tokens - x else allowed = 0 end
    elseif op == 'F' then
      if not existed and x >= 0 then
        write = false
      else
        tokens = tokens + x
      end
    elseif op == 'L' then
      if tokens >= x then
        granted = y
        if granted > tokens then granted = tokens end
        tokens = tokens - granted
        owed = owed + granted
        if mine ~= nil then owed = owed - mine[1] end
        redis.call('HSET', key, own, num(granted) .. ' ' .. num(now + hold) .. ' ' .. seq)
      else
        allowed = 0
      end
    elseif op == 'U' then
      if mine ~= nil and mine[2] == seq then
        owed = owed - mine[1] + x
        redis.call('HSET', key, own, num(x) .. ' ' .. num(mine[3]) .. ' ' .. seq)
      end
    elseif op == 'R' then
      if mine ~= nil and mine[2] == seq then
        redis.call('HDEL', key, own)
        owed = owed - mine[1]
      end
      tokens = tokens + x
    else
      write = existed
    end
    if op == 'F' or op == 'R' then
      if tokens > cap - owed then tokens = cap - owed end
      if tokens < -cap then tokens = -cap end
    end
    if write then
      if tokens >= cap and owed <= 0 then
        redis.call('DEL', key)
      else
        redis.call('HSET', key, 't', num(tokens), 'l', num(last), 'c', num(cap), 'r', num(rate))
        local ttl = 0
        if owed > 0 then ttl = hold end
        if rate > 0 then
          local full = (cap - tokens) / rate
          if full > ttl then ttl = full end
          redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
        else
          redis.call('PERSIST', key)
        end
      end
    end
    out[#out + 1] = allowed; out[#out + 1] = num(tokens); out[#out + 1] = num(granted)
    out[#out + 1] = num(cap); out[#out + 1] = num(rate)
  end
end
return out
"""


@dataclass(slots=True)
class Op:
    """One bucket operation for ``RedisBuckets.run``."""
    op: str          # A F L R U P M (see BUCKETS_LUA)
    key: str         # the full Redis key
    x: float = 0.0
    y: float = 0.0
    capacity: float = -1.0
    refill_per_s: float = -1.0
    seq: int = 0


@dataclass(slots=True)
class OpResult:
    allowed: bool
    tokens: float
    granted: float
    capacity: float
    refill_per_s: float


def _num(x: float) -> str:
    return repr(float(x))  # shortest round-trip repr: exact for Lua's tonumber


def decision(allowed: bool, tokens: float, cost: float, cap: float, rate: float) -> Any:
    """A ``gwnative.Decision`` from a bucket's state, with gwnative's formulas."""
    if tokens < cap:
        reset = _INF if rate == 0.0 else (cap - tokens) / rate
    else:
        reset = 0.0
    if allowed:
        retry = 0.0
    elif cost > cap or rate == 0.0:
        retry = _INF
    else:
        retry = (cost - tokens) / rate
    return gwnative.Decision(allowed, tokens, retry, cap, reset)


class RedisBuckets:
    """Global token buckets (the ``LimitStore`` port): one EVALSHA per ``run``."""

    def __init__(self, conn: RedisConnection, *, prefix: str = "gw:rl:",
                 clock: str = "redis", worker_id: str | None = None,
                 hold_s: float = LEASE_S + LEASE_HOLD_MARGIN_S) -> None:
        if clock not in ("redis", "caller"):
            raise ValueError("clock must be 'redis' or 'caller'")
        self.conn = conn
        self.prefix = prefix
        self.clock = clock
        self.worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.hold_s = hold_s
        self.script = conn.client.register_script(BUCKETS_LUA)
        self.calls = 0

    async def run(self, ops: Sequence[Op], now: float | None = None) -> list[OpResult]:
        """Apply ``ops`` in order, atomically, in one round trip."""
        args: list[str] = ["" if self.clock == "redis" or now is None else _num(now),
                           self.worker_id, _num(self.hold_s)]
        keys = []
        for o in ops:
            keys.append(o.key)
            args += [o.op, _num(o.x), _num(o.y), str(o.seq), _num(o.capacity),
                     _num(o.refill_per_s)]
        self.calls += 1
        raw = await self.conn.call(self.script, keys=keys, args=args)
        return [OpResult(bool(raw[i]), float(raw[i + 1]), float(raw[i + 2]),
                         float(raw[i + 3]), float(raw[i + 4])) for i in range(0, len(raw), 5)]

    async def acquire(self, key: str, cost: float, now: float, capacity: float,
                      refill_per_s: float) -> Any:
        (r,) = await self.run([Op("A", self.prefix + key, cost, 0.0, capacity, refill_per_s)],
                              now)
        return decision(r.allowed, r.tokens, cost, r.capacity, r.refill_per_s)

    async def refund(self, key: str, amount: float, now: float, capacity: float,
                     refill_per_s: float) -> float:
        (r,) = await self.run([Op("F", self.prefix + key, amount, 0.0, capacity,
                                  refill_per_s)], now)
        return r.tokens


# ---------------------------------------------------------------------------------------
# Leases

class _Slice:
    __slots__ = ("balance", "expires_at", "taken_at", "granted", "seq", "capacity",
                 "refill_per_s", "rate_est", "global_tokens", "leasing", "waiting",
                 "reported", "denied_until", "denied_cost")

    def __init__(self, capacity: float, refill_per_s: float) -> None:
        self.balance = 0.0
        self.expires_at = -_INF
        self.taken_at = 0.0
        self.granted = 0.0
        self.seq = 0
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self.rate_est = -1.0          # tokens/s taken on this worker; < 0: not known yet
        self.global_tokens = capacity  # the bucket's tokens at the last lease
        self.leasing: trio.Event | None = None
        self.waiting = 0.0            # costs of requests waiting for the lease in flight
        self.reported = 0.0           # the unspent balance Redis counts for this slice
        self.denied_until = -_INF     # Redis said no: requests costing denied_cost or
        self.denied_cost = _INF       # more are denied here until then, no round trip


@dataclass(slots=True)
class Want:
    key: str          # the full Redis key
    cost: float
    capacity: float
    refill_per_s: float


class LeasedBuckets:
    """One worker's slices of the global buckets (see the module docstring)."""

    def __init__(self, buckets: RedisBuckets, *, instances: Callable[[], int] = lambda: 1,
                 lease_s: float = LEASE_S, flush_s: float = FLUSH_S) -> None:
        self.buckets = buckets
        self.instances = instances
        self.lease_s = lease_s
        self.flush_s = flush_s
        self.slices: dict[str, _Slice] = {}
        self.pending: dict[str, list[float]] = {}  # key -> [amount, capacity, rate]
        self.returns: dict[str, tuple[float, int, float, float]] = {}  # key -> remainder...
        self.members_seen = 0
        self._seq = 0
        self._wake = trio.Event()
        self._last_heartbeat = -_INF
        # statistics
        self.leases = 0             # slices granted
        self.lease_calls = 0        # round trips on the admit path
        self.local_takes = 0        # takes served by a slice
        self.flush_calls = 0
        self.denied = 0

    def members_key(self) -> str:
        return self.buckets.prefix + "members"

    # -- hot path, sync ------------------------------------------------------------

    def take(self, key: str, cost: float, now: float) -> bool:
        s = self.slices.get(key)
        if s is None or s.leasing is not None or now >= s.expires_at or s.balance < cost:
            return False
        s.balance -= cost
        self.local_takes += 1
        return True

    def give_back(self, key: str, amount: float, now: float, capacity: float,
                  refill_per_s: float) -> None:
        """Undo a take (the request was denied elsewhere)."""
        s = self.slices.get(key)
        if s is not None and s.leasing is None and now < s.expires_at:
            s.balance += amount
        else:
            self._queue(key, amount, capacity, refill_per_s)

    def adjust(self, key: str, amount: float, now: float, capacity: float,
               refill_per_s: float) -> None:
        """Settle: credit (> 0) or debit (< 0) a bucket.  A debit is paid from the live
        slice first; the rest, and every credit, goes to Redis with the next call."""
        if amount < 0:
            s = self.slices.get(key)
            if s is not None and s.leasing is None and now < s.expires_at and s.balance > 0:
                paid = min(s.balance, -amount)
                s.balance -= paid
                amount += paid
            if amount == 0:
                return
        self._queue(key, amount, capacity, refill_per_s)

    def _queue(self, key: str, amount: float, capacity: float, refill_per_s: float) -> None:
        p = self.pending.get(key)
        if p is None:
            self.pending[key] = [amount, capacity, refill_per_s]
        else:
            p[0] += amount
        self._wake.set()

    def cached_denial(self, key: str, cost: float, now: float) -> float | None:
        """Seconds to wait if Redis denied this bucket a moment ago for this cost or
        less (a 429 storm costs Redis nothing), else None."""
        s = self.slices.get(key)
        if s is None or now >= s.denied_until or cost < s.denied_cost:
            return None
        return s.denied_until - now

    def wait_for(self, key: str, cost: float) -> trio.Event | None:
        s = self.slices.get(key)
        if s is None or s.leasing is None:
            return None
        s.waiting += cost
        return s.leasing

    def remaining(self, key: str) -> float:
        """Best local estimate of a bucket's tokens: Redis's at the last lease + slice."""
        s = self.slices.get(key)
        return 0.0 if s is None else s.global_tokens + max(s.balance, 0.0)

    # -- leases, one round trip ------------------------------------------------------

    def _want(self, s: _Slice, cost: float, now: float) -> float:
        cap = s.capacity
        n = max(1, self.instances())
        lmax = min(cap * LEASE_MAX_FRACTION, cap / n)
        if s.rate_est < 0:
            extra = cost * (INITIAL_LEASE_COSTS - 1)
        else:
            extra = s.rate_est * LEASE_HORIZON_S
        extra = max(extra, s.waiting)
        return cost + max(0.0, min(extra, lmax - cost))

    async def lease(self, wants: Sequence[Want], now: float) -> list[OpResult]:
        """Take a fresh slice of each bucket, the request's own cost included and taken.

        Every pending credit/debit/return goes in the same call.  Returns one result
        per want (``allowed`` False: the bucket cannot give ``cost``; nothing taken).
        Raises RedisDown (the slices of these keys are dropped).
        """
        pending = self._pending_ops(now)
        ops = list(pending)
        leased: list[tuple[_Slice, Want, int]] = []
        for w in wants:
            s = self.slices.get(w.key)
            if s is None:
                s = self.slices[w.key] = _Slice(w.capacity, w.refill_per_s)
            s.capacity, s.refill_per_s = w.capacity, w.refill_per_s
            self._observe(s, now)
            if s.seq:  # renewal: the remainder goes back in the same call
                ops.append(Op("R", w.key, max(s.balance, 0.0), 0.0, w.capacity,
                              w.refill_per_s, s.seq))
            want = self._want(s, w.cost, now)
            self._seq += 1
            s.seq = self._seq
            s.balance = 0.0
            s.granted = 0.0
            s.expires_at = -_INF
            s.taken_at = now
            s.waiting = 0.0
            s.leasing = trio.Event()
            leased.append((s, w, len(ops)))
            ops.append(Op("L", w.key, w.cost, want, w.capacity, w.refill_per_s, s.seq))
        self.lease_calls += 1
        try:
            results = await self.buckets.run(ops, now)
        except RedisDown:
            self._requeue_debits(pending)
            for s, w, _ in leased:
                s.seq = 0
            raise
        finally:
            for s, w, _ in leased:
                ev, s.leasing = s.leasing, None
                if ev is not None:
                    ev.set()
        out = []
        for s, w, i in leased:
            r = results[i]
            out.append(r)
            s.global_tokens = r.tokens
            if r.allowed:
                self.leases += 1
                s.granted = r.granted
                s.balance = r.granted - w.cost
                s.reported = r.granted
                s.expires_at = now + self.lease_s
            else:
                self.denied += 1
                s.seq = 0
                d = decision(False, r.tokens, w.cost, r.capacity, r.refill_per_s)
                s.denied_until = now + min(d.retry_after_s, DENIAL_CACHE_S)
                s.denied_cost = w.cost
        self._wake.set()
        return out

    def _pending_ops(self, now: float) -> list[Op]:
        ops: list[Op] = []
        # What the live slices of credited buckets spent: Redis stops counting it against
        # the refill ceiling, so the credits below are not clipped by tokens that are
        # gone already.  (Other slices report at renewal or expiry.)
        for key, p in self.pending.items():
            s = self.slices.get(key)
            if (p[0] > 0 and s is not None and s.leasing is None and s.seq
                    and now < s.expires_at and s.balance != s.reported):
                s.reported = max(s.balance, 0.0)
                ops.append(Op("U", key, s.reported, 0.0, s.capacity, s.refill_per_s, s.seq))
        for key, (rem, seq, cap, rate) in self.returns.items():
            ops.append(Op("R", key, rem, 0.0, cap, rate, seq))
        self.returns.clear()
        for key, (amount, cap, rate) in self.pending.items():
            if amount:
                ops.append(Op("F", key, amount, 0.0, cap, rate))
        self.pending.clear()
        return ops

    def _requeue_debits(self, ops: Sequence[Op]) -> None:
        # A failed call may or may not have been applied: send debits again (counted
        # twice at worst: conservative), drop credits and returns (lost at worst).
        for o in ops:
            if o.op == "F" and o.x < 0:
                self._queue(o.key, o.x, o.capacity, o.refill_per_s)

    def drop_slices(self) -> None:
        """Redis went down: slices are not used any more (their tokens are not spent)."""
        for key, s in list(self.slices.items()):
            if s.leasing is None:
                del self.slices[key]
        self.returns.clear()

    def _expire(self, now: float) -> float:
        """Move expired slices' remainders to the returns; the time of the next expiry.

        An expired slice keeps its rate estimate (for the size of the next lease) until
        the key has been idle for SLICE_FORGET_S."""
        nxt = _INF
        for key, s in list(self.slices.items()):
            if s.leasing is not None:
                continue
            if s.seq and now >= s.expires_at:
                self._observe(s, now)
                self.returns[key] = (max(s.balance, 0.0), s.seq, s.capacity, s.refill_per_s)
                s.seq = 0
                s.balance = s.granted = 0.0
            elif not s.seq:
                if now - s.taken_at > SLICE_FORGET_S:
                    del self.slices[key]
            elif s.expires_at < nxt:
                nxt = s.expires_at
        return nxt

    @staticmethod
    def _observe(s: _Slice, now: float) -> None:
        """Update the slice's rate estimate with what its last lease saw used."""
        if s.granted > 0 and now > s.taken_at:
            used = s.granted - max(s.balance, 0.0)
            inst = used / max(now - s.taken_at, 1e-3)
            s.rate_est = inst if s.rate_est < 0 else 0.5 * (s.rate_est + inst)

    async def flush(self, now: float) -> None:
        """Send expired slices back and the queued credits/debits, with a heartbeat."""
        self._expire(now)
        ops = self._pending_ops(now)
        heartbeat = now - self._last_heartbeat >= HEARTBEAT_S
        if heartbeat:
            ops.append(Op("M", self.members_key(), HEARTBEAT_S * 3))
        if not ops:
            return
        self.flush_calls += 1
        try:
            results = await self.buckets.run(ops, now)
        except RedisDown:
            self._requeue_debits(ops)
            return
        if heartbeat:
            self._last_heartbeat = now
            self.members_seen = int(results[-1].tokens)

    async def run(self) -> None:
        """The flusher: returns expired slices and settles, off the hot path."""
        while True:
            now = trio.current_time()
            nxt = self._expire(now)
            due = nxt
            if self.pending or self.returns:
                due = min(due, now + self.flush_s)
            due = min(due, self._last_heartbeat + HEARTBEAT_S)
            self._wake = trio.Event()
            with trio.move_on_at(due):
                await self._wake.wait()
                # something was queued: let more gather before the call
                await trio.sleep(self.flush_s)
            if self.buckets.conn.up:
                await self.flush(trio.current_time())
            else:
                self.drop_slices()
                await trio.sleep(self.flush_s)

    def statistics(self) -> dict[str, Any]:
        return {"limiter_leases_total": self.leases,
                "limiter_lease_calls_total": self.lease_calls,
                "limiter_lease_denied_total": self.denied,
                "limiter_local_takes_total": self.local_takes,
                "limiter_flush_calls_total": self.flush_calls,
                "limiter_slices": sum(1 for s in self.slices.values() if s.seq),
                "limiter_members_seen": self.members_seen}


# ---------------------------------------------------------------------------------------
# Cache

# 1 MiB: far above a typical chat answer (a few KiB), small enough that one entry never
# crowds a shared Redis.
MAX_VALUE_BYTES = 1024 * 1024


class RedisCache:
    """The ``CacheStore`` port on Redis: GET / SET PX.  Down: a miss, nothing stored."""

    def __init__(self, conn: RedisConnection, *, prefix: str = "gw:c:",
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self.conn = conn
        self.prefix = prefix
        self.max_value_bytes = max_value_bytes
        self.skipped = 0      # lookups/stores not done because Redis is down
        self.too_large = 0

    async def get(self, key: str) -> bytes | None:
        if not self.conn.up:
            self.skipped += 1
            return None
        try:
            value = await self.conn.call(self.conn.client.get, self.prefix + key)
        except RedisDown:
            self.skipped += 1
            return None
        return None if value is None else bytes(value)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_value_bytes:
            self.too_large += 1
            return
        if not self.conn.up:
            self.skipped += 1
            return
        try:
            await self.conn.call(self.conn.client.set, self.prefix + key, value,
                                 px=max(1, math.ceil(ttl_s * 1000)))
        except RedisDown:
            self.skipped += 1

    def statistics(self) -> dict[str, Any]:
        return {"cache_redis_skipped_total": self.skipped,
                "cache_redis_too_large_total": self.too_large}
