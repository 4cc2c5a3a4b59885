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

The master key is not limited.  With no keys configured at all (an open gateway on
loopback) there is no caller to limit, so only the model limits apply.

Headers follow OpenAI's: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for
the key's own limits, and ``retry-after`` / ``retry-after-ms`` on a 429.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gwnative
from gwcore.auth import KeyInfo
from gwcore.config import Config, LimitSpec
from gwcore.errors import RateLimited
from gwcore.wire import Usage

# Reserved for the completion when the request names no max_tokens: a typical chat
# answer's size; the real usage settles the difference afterwards.
DEFAULT_COMPLETION = 256


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


def estimate_tokens(body: dict[str, Any], body_bytes: int) -> float:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = limit if isinstance(limit, int) and limit > 0 else DEFAULT_COMPLETION
    return float(body_bytes // 4 + completion)


@dataclass(slots=True)
class Admission:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    token_keys: list[tuple[str, float, float]] = field(default_factory=list)  # key, cap, rate
    reserved: float = 0.0
    concurrency_key: str | None = None


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
    def __init__(self, cfg: Config) -> None:
        self.default = _Spec.of(cfg.limits.default)
        self.models = {name: _Spec.of(spec) for name, spec in cfg.limits.models.items()}
        self.requests = gwnative.TokenBuckets(max(self.default.req_cap, 1.0),
                                              max(self.default.req_rate, 0.0))
        self.tokens = gwnative.TokenBuckets(max(self.default.tok_cap, 1.0),
                                            self.default.tok_cap / 60.0)
        self.in_flight: dict[str, int] = {}
        self.rejected_total = 0

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

    def admit(self, key: KeyInfo, model: str, body: dict[str, Any], body_bytes: int,
              now: float) -> Admission:
        adm = Admission()
        dims: list[tuple[str, _Spec, bool]] = []  # bucket key, spec, is the caller's own
        if key.id != "anonymous" and not key.is_master:
            dims.append((f"k:{key.id}", self._key_spec(key), True))
        mspec = self.models.get(model)
        if mspec is not None:
            dims.append((f"m:{model}", mspec, False))
        if not dims:
            return adm
        taken: list[tuple[str, _Spec]] = []
        estimate = estimate_tokens(body, body_bytes)
        try:
            for bkey, spec, own in dims:
                if spec.req_cap:
                    d = self.requests.acquire(bkey, 1.0, now, spec.req_cap, spec.req_rate)
                    if not d.allowed:
                        raise self._denied("requests", bkey, d.retry_after_s, own)
                    taken.append((bkey, spec))
                    if own:
                        adm.headers += _headers("requests", d.limit, d.remaining, d.reset_s)
                if spec.tok_cap:
                    rate = spec.tok_cap / 60.0
                    d = self.tokens.acquire(bkey, estimate, now, spec.tok_cap, rate)
                    if not d.allowed:
                        raise self._denied("tokens", bkey, d.retry_after_s, own)
                    adm.token_keys.append((bkey, spec.tok_cap, rate))
                    if own:
                        adm.headers += _headers("tokens", d.limit, d.remaining, d.reset_s)
            for bkey, spec, own in dims:
                if own and spec.max_concurrency:
                    n = self.in_flight.get(bkey, 0)
                    if n >= spec.max_concurrency:
                        raise RateLimited(f"Too many requests in flight for this key "
                                          f"(at most {spec.max_concurrency}).",
                                          headers=[("retry-after", "1")])
                    self.in_flight[bkey] = n + 1
                    adm.concurrency_key = bkey
        except RateLimited:
            self.rejected_total += 1
            for bkey, spec in taken:
                self.requests.refund(bkey, 1.0, now, spec.req_cap, spec.req_rate)
            for bkey, cap, rate in adm.token_keys:
                self.tokens.refund(bkey, estimate, now, cap, rate)
            raise
        adm.reserved = estimate
        return adm

    def settle(self, adm: Admission, usage: Usage | None, now: float, *, failed: bool) -> None:
        """Square the token reservation with the real usage; release the concurrency slot."""
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
            for bkey, cap, rate in adm.token_keys:
                self.tokens.refund(bkey, delta, now, cap, rate)
        adm.token_keys = []

    def evict_idle(self, now: float) -> int:
        return self.requests.evict_idle(now) + self.tokens.evict_idle(now)

    def statistics(self) -> dict[str, int]:
        return {"limiter_keys": len(self.requests) + len(self.tokens),
                "limiter_rejected_total": self.rejected_total}

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


def _headers(what: str, limit: float, remaining: float, reset_s: float) -> list[tuple[bytes, bytes]]:
    return [(b"x-ratelimit-limit-" + what.encode(), b"%d" % int(limit)),
            (b"x-ratelimit-remaining-" + what.encode(), b"%d" % max(0, math.floor(remaining))),
            (b"x-ratelimit-reset-" + what.encode(), format_duration(reset_s).encode())]
