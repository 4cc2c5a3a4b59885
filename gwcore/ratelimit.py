"""Rate limits over the gwnative token buckets: requests and tokens, per key and model.

How this works: each gateway key has a requests bucket (``requests`` per ``window_s``:
capacity ``requests``, refilled at ``requests / window_s`` per second) and, when a token
limit applies, a tokens bucket (capacity ``tokens_per_minute``, refilled per second at a
sixtieth of it).  Models named under ``limits.models`` have the same two buckets, shared
by all keys.  ``admit`` takes one request from every requests bucket and reserves an
estimate of the tokens (prompt bytes / 4 plus ``max_tokens``, or DEFAULT_COMPLETION
when the client sets none) from every tokens bucket; ``settle`` gives back the
difference to the real usage once the response (or stream) is done, or takes the
excess.  A denial anywhere undoes what this request already took.

With Redis (``RateLimiter(cfg, redis=conn)``, ``REDIS_URL``) the same buckets are global
across workers and instances: each worker admits from slices it leases from Redis (at
most one round trip per request, none while its slices last), settles locally and sends
the differences in batches; ``gwcore/stores/redis.py`` explains the leases and how far
over a limit the cluster can go.  Redis down: ``limits.redis_fail: open`` (default)
limits each worker with local buckets of 1/N of every limit (N: ``limits.instances``,
else the live workers last seen in Redis, else ``server.workers``); ``closed`` answers
503 (``LimitsUnavailable``).  ``max_concurrency`` is always per worker process.

The master key is not limited.  With no keys configured at all (an open gateway on
loopback) there is no caller to limit, so only the model limits apply.

Headers follow OpenAI's: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for
the key's own limits, and ``retry-after`` / ``retry-after-ms`` on a 429.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio

import gwnative
from gwcore.accesslog import event
from gwcore.auth import KeyInfo
from gwcore.config import Config, LimitSpec
from gwcore.errors import GatewayError, RateLimited
from gwcore.stores.redis import (LeasedBuckets, RedisBuckets, RedisConnection, RedisDown, Want,
                                 decision)
from gwcore.wire import Usage

# Reserved for the completion when the request names no max_tokens: a typical chat
# answer's size; the real usage settles the difference afterwards.
DEFAULT_COMPLETION = 256
_INF = float("inf")


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def estimate_usage(body: dict[str, Any], body_bytes: int) -> Usage:
    """A call's usage before it happens: prompt bytes / 4, and max_tokens or a default."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = limit if isinstance(limit, int) and limit > 0 else DEFAULT_COMPLETION
    return Usage(prompt_tokens=body_bytes // 4, completion_tokens=completion)


def estimate_tokens(body: dict[str, Any], body_bytes: int) -> float:
    return float(estimate_usage(body, body_bytes).total_tokens)


class LimitsUnavailable(GatewayError):
    """Redis is down and ``limits.redis_fail`` is ``closed``: no request is admitted
    rather than one beyond the global limits."""
    status = 503
    type = "api_error"
    code = "upstream_unavailable"
    anthropic_type = "overloaded_error"
    message = ("Rate limits are unavailable: the limits store (Redis) cannot be reached "
               "and the gateway is configured to fail closed (limits.redis_fail: closed).")


# Admission.via
MEMORY, LEASED, FALLBACK = 0, 1, 2


@dataclass(slots=True)
class Admission:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    token_keys: list[tuple[str, float, float]] = field(default_factory=list)  # key, cap, rate
    reserved: float = 0.0
    concurrency_key: str | None = None
    via: int = MEMORY
    round_trips: int = 0  # Redis round trips this admission waited for (0 or 1)


@dataclass(frozen=True, slots=True)
class _Spec:
    req_cap: float
    req_rate: float
    tok_cap: float  # 0: no token limit
    max_concurrency: int

    @classmethod
    def of(cls, spec: LimitSpec) -> "_Spec":
        req = float(spec.requests or 0)
        tpm = float(spec.tokens_per_minute or 0)
        return cls(req, req / spec.window_s if req else 0.0, tpm, spec.max_concurrency or 0)


class RateLimiter:
    """Requests and tokens buckets per key and model: in-process (``redis=None``, the
    default) or global in Redis through this worker's leases (see
    ``gwcore/stores/redis.py`` for the leases and the worst-case bound)."""

    def __init__(self, cfg: Config, redis: "RedisConnection | None" = None) -> None:
        self.default = _Spec.of(cfg.limits.default)
        self.models = {name: _Spec.of(spec) for name, spec in cfg.limits.models.items()}
        self.requests = gwnative.TokenBuckets(max(self.default.req_cap, 1.0),
                                              max(self.default.req_rate, 0.0))
        self.tokens = gwnative.TokenBuckets(max(self.default.tok_cap, 1.0),
                                            self.default.tok_cap / 60.0)
        self.in_flight: dict[str, int] = {}
        self.rejected_total = 0
        self.redis = redis
        self.leases: LeasedBuckets | None = None
        self.fail_closed = getattr(cfg.limits, "redis_fail", "open") == "closed"
        self.configured_instances = int(getattr(cfg.limits, "instances", 0) or 0)
        self.workers = max(1, int(getattr(cfg.server, "workers", 1) or 1))
        self.fallback_requests: Any = None   # local 1/N tables while Redis is down
        self.fallback_tokens: Any = None
        self.fallback_scale = 1.0
        self.fallback_admits = 0
        self.fallback_switches = 0
        self.unavailable_total = 0
        if redis is not None:
            prefix = getattr(cfg.limits, "redis_prefix", "gw:rl:")
            self.leases = LeasedBuckets(RedisBuckets(redis, prefix=prefix),
                                        instances=self.instances)

    def instances(self) -> int:
        """N for the 1/N fallback and for slice sizes: ``limits.instances`` if set, else
        the live workers last seen in Redis, else this instance's workers."""
        if self.configured_instances > 0:
            return self.configured_instances
        seen = self.leases.members_seen if self.leases is not None else 0
        return max(seen, self.workers, 1)

    def _key_spec(self, key: KeyInfo) -> _Spec:
        d = self.default
        if key.rpm is None and key.tpm is None and key.max_concurrency is None:
            return d
        req_cap, req_rate = d.req_cap, d.req_rate
        if key.rpm is not None:
            req_cap, req_rate = float(key.rpm), key.rpm / 60.0
        tok = float(key.tpm) if key.tpm is not None else d.tok_cap
        conc = key.max_concurrency if key.max_concurrency is not None else d.max_concurrency
        return _Spec(req_cap, req_rate, tok, conc)

    async def admit(self, key: KeyInfo, model: str, body: dict[str, Any], body_bytes: int,
                    now: float) -> Admission:
        """Take one request and reserve the estimated tokens from every bucket that
        applies, or raise RateLimited (nothing taken).  In-process this never waits;
        with Redis it waits for at most one round trip (a lease)."""
        dims: list[tuple[str, _Spec, bool]] = []  # bucket key, spec, is the caller's own
        if key.id != "anonymous" and not key.is_master:
            dims.append((f"k:{key.id}", self._key_spec(key), True))
        mspec = self.models.get(model)
        if mspec is not None:
            dims.append((f"m:{model}", mspec, False))
        if not dims:
            return Admission()
        estimate = estimate_tokens(body, body_bytes)
        if self.leases is None:
            return self._admit_tables(dims, estimate, now, self.requests, self.tokens, 1.0,
                                      MEMORY)
        assert self.redis is not None
        if self.redis.up:
            if self.fallback_requests is not None:
                self.fallback_requests = self.fallback_tokens = None  # global again
            try:
                return await self._admit_leased(dims, estimate, now)
            except RedisDown:
                pass
        if self.fail_closed:
            self.unavailable_total += 1
            raise LimitsUnavailable(headers=[("retry-after", "1")])
        if self.fallback_requests is None:
            n = self.instances()
            self.fallback_scale = 1.0 / n
            self.fallback_requests = gwnative.TokenBuckets(1.0, 0.0)
            self.fallback_tokens = gwnative.TokenBuckets(1.0, 0.0)
            self.fallback_switches += 1
            event("limits_fallback", level="warning", instances=n,
                  note=f"Redis down: each worker limits alone with 1/{n} of every limit")
        self.fallback_admits += 1
        return self._admit_tables(dims, estimate, now, self.fallback_requests,
                                  self.fallback_tokens, self.fallback_scale, FALLBACK)

    def _admit_tables(self, dims: list[tuple[str, _Spec, bool]], estimate: float, now: float,
                      requests: Any, tokens: Any, scale: float, via: int) -> Admission:
        adm = Admission(via=via)
        taken: list[tuple[str, float, float]] = []
        try:
            for bkey, spec, own in dims:
                if spec.req_cap:
                    cap, rate = spec.req_cap * scale, spec.req_rate * scale
                    d = requests.acquire(bkey, 1.0, now, cap, rate)
                    if not d.allowed:
                        raise self._denied("requests", bkey, d.retry_after_s, own)
                    taken.append((bkey, cap, rate))
                    if own:
                        adm.headers += _headers("requests", d.limit, d.remaining, d.reset_s)
                if spec.tok_cap:
                    cap = spec.tok_cap * scale
                    rate = cap / 60.0
                    d = tokens.acquire(bkey, estimate, now, cap, rate)
                    if not d.allowed:
                        raise self._denied("tokens", bkey, d.retry_after_s, own)
                    adm.token_keys.append((bkey, cap, rate))
                    if own:
                        adm.headers += _headers("tokens", d.limit, d.remaining, d.reset_s)
            self._enter(dims, adm)
        except RateLimited:
            self.rejected_total += 1
            for bkey, cap, rate in taken:
                requests.refund(bkey, 1.0, now, cap, rate)
            for bkey, cap, rate in adm.token_keys:
                tokens.refund(bkey, estimate, now, cap, rate)
            raise
        adm.reserved = estimate
        return adm

    def _enter(self, dims: list[tuple[str, _Spec, bool]], adm: Admission) -> None:
        """The per-key concurrency cap (per worker process, also with Redis)."""
        for bkey, spec, own in dims:
            if own and spec.max_concurrency:
                n = self.in_flight.get(bkey, 0)
                if n >= spec.max_concurrency:
                    raise RateLimited(f"Too many requests in flight for this key "
                                      f"(at most {spec.max_concurrency}).",
                                      headers=[("retry-after", "1")])
                self.in_flight[bkey] = n + 1
                adm.concurrency_key = bkey

    async def _admit_leased(self, dims: list[tuple[str, _Spec, bool]], estimate: float,
                            now: float) -> Admission:
        """From this worker's slices; one lease round trip for every bucket short."""
        leases = self.leases
        assert leases is not None
        prefix = leases.buckets.prefix
        # (redis key, cost, cap, rate, dim index, what)
        need: list[tuple[str, float, float, float, int, str]] = []
        for i, (bkey, spec, own) in enumerate(dims):
            if spec.req_cap:
                need.append((prefix + "r:" + bkey, 1.0, spec.req_cap, spec.req_rate, i,
                             "requests"))
            if spec.tok_cap:
                cap = spec.tok_cap
                if estimate > cap:  # never, whatever the others do: no round trip
                    self.rejected_total += 1
                    raise self._denied("tokens", bkey, _INF, own)
                need.append((prefix + "t:" + bkey, estimate, cap, cap / 60.0, i, "tokens"))
        taken: list[tuple[str, float, float, float, int, str]] = []
        missing = []
        for item in need:
            (taken if leases.take(item[0], item[1], now) else missing).append(item)
        adm = Admission(via=LEASED)
        denied: tuple[str, float, int] | None = None
        if missing:
            while True:  # requests short of the same slice share the lease in flight
                evs = [ev for m in missing if (ev := leases.wait_for(m[0], m[1])) is not None]
                if not evs:
                    break
                for ev in evs:
                    await ev.wait()
                now = trio.current_time()
                still = []
                for item in missing:
                    (taken if leases.take(item[0], item[1], now) else still).append(item)
                missing = still
                if not missing:
                    break
        if missing:
            for item in missing:  # denied by Redis a moment ago: no round trip
                wait_s = leases.cached_denial(item[0], item[1], now)
                if wait_s is not None:
                    denied = (item[5], wait_s, item[4])
                    missing = []
                    break
        if missing:
            adm.round_trips = 1
            try:
                results = await leases.lease(
                    [Want(m[0], m[1], m[2], m[3]) for m in missing], now)
            except RedisDown:
                self._give_back(taken, now)
                raise
            for item, r in zip(missing, results):
                if r.allowed:
                    taken.append(item)
                elif denied is None:
                    d = decision(False, r.tokens, item[1], r.capacity, r.refill_per_s)
                    denied = (item[5], d.retry_after_s, item[4])
        try:
            if denied is not None:
                what, retry, i = denied
                bkey, spec, own = dims[i]
                raise self._denied(what, bkey, retry, own)
            self._enter(dims, adm)
        except RateLimited:
            self.rejected_total += 1
            self._give_back(taken, now)
            raise
        for rkey, cost, cap, rate, i, what in taken:
            if what == "tokens":
                adm.token_keys.append((rkey, cap, rate))
        # Headers, in the order of the in-process path: the caller's own limits only.
        for rkey, cost, cap, rate, i, what in need:
            if dims[i][2]:
                rem = leases.remaining(rkey)
                adm.headers += _headers(what, cap, rem, _reset(rem, cap, rate))
        adm.reserved = estimate
        return adm

    def _give_back(self, taken: list[tuple[str, float, float, float, int, str]],
                   now: float) -> None:
        assert self.leases is not None
        for rkey, cost, cap, rate, i, what in taken:
            self.leases.give_back(rkey, cost, now, cap, rate)

    def settle(self, adm: Admission, usage: Usage | None, now: float, *, failed: bool) -> None:
        """Square the token reservation with the real usage; release the concurrency slot.

        Never waits: with Redis the difference is settled against this worker's slice
        and queued for Redis (``LeasedBuckets.adjust``)."""
        if adm.concurrency_key is not None:
            n = self.in_flight.get(adm.concurrency_key, 1) - 1
            if n > 0:
                self.in_flight[adm.concurrency_key] = n
            else:
                self.in_flight.pop(adm.concurrency_key, None)
            adm.concurrency_key = None
        if not adm.token_keys:
            return
        if usage is not None:
            delta = adm.reserved - usage.total_tokens
        elif failed:
            delta = adm.reserved  # no answer, no tokens spent
        else:
            return  # answered but usage unknown: keep the estimate
        if delta:
            if adm.via == MEMORY:
                for bkey, cap, rate in adm.token_keys:
                    self.tokens.refund(bkey, delta, now, cap, rate)
            elif adm.via == LEASED:
                assert self.leases is not None
                for rkey, cap, rate in adm.token_keys:
                    self.leases.adjust(rkey, delta, now, cap, rate)
            elif self.fallback_tokens is not None:  # FALLBACK, still down
                for bkey, cap, rate in adm.token_keys:
                    self.fallback_tokens.refund(bkey, delta, now, cap, rate)
        adm.token_keys = []

    async def run(self) -> None:
        """With Redis: return expired slices and send settled usage, off the hot path.
        In-process there is nothing to do (idle buckets: ``evict_idle``)."""
        if self.leases is not None:
            await self.leases.run()

    def ready_state(self) -> str:
        """For /readyz: ``ok``; with Redis down ``degraded`` (fail open: serving under
        local 1/N limits) or ``down`` (fail closed: limited requests get 503)."""
        if self.redis is None or self.redis.up:
            return "ok"
        return "down" if self.fail_closed else "degraded"

    def evict_idle(self, now: float) -> int:
        n = self.requests.evict_idle(now) + self.tokens.evict_idle(now)
        if self.fallback_requests is not None:
            n += self.fallback_requests.evict_idle(now) + self.fallback_tokens.evict_idle(now)
        return n

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limiter_keys": len(self.requests) + len(self.tokens),
                               "limiter_rejected_total": self.rejected_total}
        if self.leases is not None and self.redis is not None:
            out.update(self.leases.statistics())
            out.update(self.redis.statistics())
            out.update({"limiter_global": int(self.redis.up),
                        "limiter_instances": self.instances(),
                        "limiter_fallback_admits_total": self.fallback_admits,
                        "limiter_fallback_switches_total": self.fallback_switches,
                        "limiter_unavailable_total": self.unavailable_total})
        return out

    def _denied(self, what: str, bkey: str, retry_after_s: float, own: bool) -> RateLimited:
        whose = "this key" if own else f"the model '{bkey[2:]}'"
        if math.isinf(retry_after_s):
            return RateLimited(f"This request needs more {what} than the limit of {whose} "
                               "allows at all.", headers=[])
        wait_s = max(retry_after_s, 0.001)
        return RateLimited(
            f"Rate limit reached for {whose} ({what}); try again in {format_duration(wait_s)}.",
            headers=[("retry-after", str(max(1, math.ceil(wait_s)))),
                     ("retry-after-ms", str(math.ceil(wait_s * 1000)))])


def _reset(tokens: float, cap: float, rate: float) -> float:
    if tokens >= cap:
        return 0.0
    return _INF if rate == 0.0 else (cap - tokens) / rate


_HEADER_NAMES = {what: tuple(b"x-ratelimit-%s-%s" % (part, what.encode())
                            for part in (b"limit", b"remaining", b"reset"))
                 for what in ("requests", "tokens")}


def _headers(what: str, limit: float, remaining: float, reset_s: float) -> list[tuple[bytes, bytes]]:
    limit_name, remaining_name, reset_name = _HEADER_NAMES[what]
    return [(limit_name, b"%d" % limit),
            (remaining_name, b"%d" % (remaining if remaining > 0 else 0)),
            (reset_name, format_duration(reset_s).encode())]
