"""Gateway keys: who is calling, what it may do, and whether its budget allows it.

Keys are never compared as strings: the presented key is hashed (SHA-256) and the
digest looked up, then confirmed with ``hmac.compare_digest``, so the time taken does
not depend on how much of a key matched.  Only digests are held, in memory and in the
store, and keys never appear in logs or errors (the log carries the key's name).

Static keys (``GATEWAY_API_KEYS``, ``keys:`` in the config, the master key) are
resolved in memory.  Dynamic keys live in the KeyStore; a lookup is cached in-process
for ``KEY_CACHE_TTL_S`` (hits and misses alike, bounded), so a key revoked through the
admin API or the CLI stops working on every worker within that time.

Budgets: a key's spend is what the store has recorded (the audit writer adds every
request's cost there, within about a second) or what this process has added since,
whichever is larger.  Before a call, its cost is estimated (prompt bytes / 4 and
``max_tokens`` or 256 completion tokens, at the model's price) and reserved; a call
that would take spend plus reservations past the budget gets 429
``insufficient_quota``; after it, the reservation gives way to the real cost.  So one
worker never spends past a budget; a cluster can overshoot it by what other workers
spent in the last flush interval and key-cache TTL (a few seconds).

The key store unreachable (the database is down): a dynamic key this worker has
accepted before goes on working on its last known record, and its spend is what this
worker knows; any other key (unknown, revoked, expired, never seen here) gets 503
``KeyStoreUnavailable``, so the answer says nothing about whether such a key exists.
After a failed lookup the store is left alone for ``STORE_RETRY_S``, so a dead
database costs one failed lookup a second, not one (or a connect timeout) per request.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gwcore.config import Config
from gwcore.errors import GatewayError, InsufficientQuota, InvalidApiKey, ModelNotAllowed
from gwcore.ports import KeyRecord, KeyStore

KEY_CACHE_TTL_S = 5.0
KEY_CACHE_MAX = 100_000
# After the key store failed, this long before it is asked again.
STORE_RETRY_S = 1.0


class KeyStoreUnavailable(GatewayError):
    """The key store cannot be reached and this worker has not accepted the presented
    key before: it can be neither accepted nor refused (503, as ``LimitsUnavailable``)."""
    status = 503
    type = "api_error"
    code = "upstream_unavailable"
    anthropic_type = "overloaded_error"
    message = ("Gateway keys cannot be checked right now: the key store (the database) "
               "cannot be reached. Retry shortly.")


def store_unavailable(store: object, exc: Exception) -> bool:
    """Whether ``exc`` from ``store`` means it did not answer (rather than a bug): the
    SQL stores tell (``is_unavailable``); any other store's failure counts as one."""
    if store is None:
        return False
    check = getattr(store, "is_unavailable", None)
    return bool(check(exc)) if check is not None else True


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    name: str
    is_master: bool = False
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    budget_pico: int | None = None
    expires_at: float | None = None       # unix seconds (dynamic keys)

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise ModelNotAllowed(f"This key may not use the model '{model}'.", param="model")


ANONYMOUS = KeyInfo(id="anonymous", name="anonymous")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(id=record.id, name=record.name,
                   models=frozenset(record.models) if record.models is not None else None,
                   rpm=record.rpm, tpm=record.tpm, max_concurrency=record.max_concurrency,
                   budget_pico=record.budget_pico, expires_at=record.expires_at)


class Authenticator:
    def __init__(self, cfg: Config, store: KeyStore | None = None,
                 spend: Callable[[str], Awaitable[int]] | None = None) -> None:
        self._keys: dict[bytes, tuple[bytes, KeyInfo]] = {}
        for i, key in enumerate(cfg.api_keys):
            d = digest(key)
            self._keys[d] = (d, KeyInfo(id=f"static-{d[:4].hex()}", name=f"api-key-{i + 1}"))
        for k in cfg.keys:
            d = digest(k.key)
            budget = None if k.budget_usd is None else int(round(k.budget_usd * 10**12))
            self._keys[d] = (d, KeyInfo(id=f"static-{d[:4].hex()}", name=k.name,
                                        models=frozenset(k.models) if k.models is not None else None,
                                        rpm=k.rpm, tpm=k.tpm, max_concurrency=k.max_concurrency,
                                        budget_pico=budget))
        if cfg.master_key:
            d = digest(cfg.master_key)
            self._keys[d] = (d, KeyInfo(id="master", name="master", is_master=True))
        self.store = store
        # digest -> (expires at, KeyInfo or None, spent_pico from the store)
        self._cache: OrderedDict[bytes, tuple[float, KeyInfo | None, int]] = OrderedDict()
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # key id -> estimated cost of calls in flight
        self._spend_read: dict[str, float] = {}  # key id -> when the store's spend was read
        self._spend = spend
        self._store_down_until = -1.0   # monotonic; no lookups before it
        self.lookups = 0
        self.store_errors = 0
        self.stale_hits = 0
        # Open (no auth) only when there is no key anywhere; app.py also turns auth on
        # when the store holds an active key at start-up (``require_keys``).
        self.enabled = bool(self._keys)

    def require_keys(self) -> None:
        self.enabled = True

    @staticmethod
    def presented(authorization: bytes | None, x_api_key: bytes | None = None) -> bytes | None:
        return _bearer(authorization) if authorization else x_api_key

    async def authenticate(self, authorization: bytes | None,
                           x_api_key: bytes | None = None) -> KeyInfo:
        if not self.enabled:
            return ANONYMOUS
        presented = self.presented(authorization, x_api_key)
        if not presented:
            raise InvalidApiKey("You didn't provide an API key. Pass a gateway key as "
                                "'Authorization: Bearer <key>'.")
        d = hashlib.sha256(presented).digest()
        # The lookup is on a digest of the secret, so its timing says nothing about the
        # key; the stored digest is then confirmed in constant time.
        entry = self._keys.get(d)
        if entry is not None and hmac.compare_digest(entry[0], d):
            return entry[1]
        if self.store is not None:
            info = await self._dynamic(d)
            if info is not None:
                return info
        raise InvalidApiKey()

    async def _dynamic(self, d: bytes) -> KeyInfo | None:
        now = time.monotonic()
        hit = self._cache.get(d)
        if hit is not None and hit[0] > now:
            return hit[1]
        assert self.store is not None
        if now < self._store_down_until:
            return self._stale(d, hit, now)
        self.lookups += 1
        try:
            record = await self.store.get_by_hash(d.hex())
        except Exception as exc:
            if not store_unavailable(self.store, exc):
                raise
            self.store_errors += 1
            now = time.monotonic()
            self._store_down_until = now + STORE_RETRY_S
            return self._stale(d, hit, now)
        info: KeyInfo | None = None
        spent = 0
        if record is not None and hmac.compare_digest(record.key_hash, d.hex()):
            wall = time.time()
            if record.revoked_at is None and (record.expires_at is None or record.expires_at > wall):
                info = key_info(record)
                spent = record.spent_pico
        self._cache[d] = (now + KEY_CACHE_TTL_S, info, spent)
        self._cache.move_to_end(d)
        while len(self._cache) > KEY_CACHE_MAX:
            self._cache.popitem(last=False)
        if info is not None:
            self._spent[info.id] = max(self._spent.get(info.id, 0), spent)
            self._spend_read[info.id] = now
        return info

    def _stale(self, d: bytes, hit: tuple[float, KeyInfo | None, int] | None,
               now: float) -> KeyInfo:
        """The store is down: a key accepted before goes on (its entry is kept for
        another TTL); anything else is unknown for now."""
        info = hit[1] if hit is not None else None
        if hit is not None and info is not None and \
                (info.expires_at is None or info.expires_at > time.time()):
            self._cache[d] = (now + KEY_CACHE_TTL_S, info, hit[2])
            self._cache.move_to_end(d)
            self.stale_hits += 1
            return info
        raise KeyStoreUnavailable(headers=[("retry-after", "1")])

    def forget(self, key_hash_hex: str) -> None:
        """Drop a cached lookup at once (this worker's own admin changes)."""
        self._cache.pop(bytes.fromhex(key_hash_hex), None)

    # -- budgets ------------------------------------------------------------------
    async def check_budget(self, key: KeyInfo) -> None:
        if key.budget_pico is None:
            return
        now = time.monotonic()
        if self._spend is not None and now - self._spend_read.get(key.id, -KEY_CACHE_TTL_S) \
                >= KEY_CACHE_TTL_S:
            self._spend_read[key.id] = now
            try:
                recorded = await self._spend(key.id)
            except Exception as exc:
                if not store_unavailable(self.store, exc):
                    raise
                self.store_errors += 1
                recorded = 0  # the store is down: what this worker knows will do
            self._spent[key.id] = max(self._spent.get(key.id, 0), recorded)
        if self._spent.get(key.id, 0) >= key.budget_pico:
            raise InsufficientQuota("This key has used up its budget. Ask the gateway's "
                                    "operator to raise it.")

    def reserve(self, key: KeyInfo, estimate_pico: int) -> int:
        """Reserve a call's estimated cost; 429 when it would pass the budget."""
        if key.budget_pico is None or estimate_pico <= 0:
            return 0
        held = self._reserved.get(key.id, 0)
        if self._spent.get(key.id, 0) + held + estimate_pico > key.budget_pico:
            raise InsufficientQuota("This request's estimated cost is more than what is left "
                                    "of this key's budget (lower max_tokens, or ask the "
                                    "gateway's operator to raise the budget).")
        self._reserved[key.id] = held + estimate_pico
        return estimate_pico

    def release(self, key: KeyInfo, reserved_pico: int) -> None:
        if reserved_pico:
            left = self._reserved.get(key.id, 0) - reserved_pico
            if left > 0:
                self._reserved[key.id] = left
            else:
                self._reserved.pop(key.id, None)

    def add_spend(self, key: KeyInfo, cost_pico: int) -> None:
        if key.budget_pico is not None and cost_pico:
            self._spent[key.id] = self._spent.get(key.id, 0) + cost_pico

    def statistics(self) -> dict[str, int]:
        return {"key_cache_entries": len(self._cache), "key_store_lookups_total": self.lookups,
                "key_store_errors_total": self.store_errors,
                "key_stale_hits_total": self.stale_hits}


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None
