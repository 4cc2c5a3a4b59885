"""What the pipeline needs from the stores: small Protocols, one embedded and one server
implementation each (memory/SQLite by default; Redis/Postgres when configured).

The pipeline and the API layer know only these; ``app.py`` picks the implementations.
Every store method that may wait is ``async``; the SQL stores run their sync drivers
(sqlite3, psycopg) in worker threads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class KeyRecord:
    """A dynamic gateway key as stored: never the key itself, only its SHA-256."""
    id: str                          # "key_" + 16 hex chars
    name: str
    key_hash: str                    # sha256 hex of the key
    prefix: str                      # the key's first 7 characters, for people to recognise it
    models: list[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    budget_pico: int | None = None   # USD budget in pico-dollars (1e-12 USD)
    spent_pico: int = 0              # spend recorded so far (see AuditSink)
    expires_at: float | None = None  # unix seconds
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    revoked_at: float | None = None


class KeyStore(Protocol):
    async def create_key(self, record: KeyRecord) -> None:
        """Insert a new key (the caller made the id, the key and its hash)."""

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key with this hash, revoked or not (the caller checks), with spent_pico."""

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        """Change name/models/rpm/tpm/max_concurrency/budget_pico/expires_at/metadata."""

    async def revoke(self, key_id: str, now: float) -> bool: ...


@dataclass(slots=True)
class AuditRecord:
    """One request, as DESIGN.md's Accounting section lists (no bodies, no keys)."""
    ts: float                        # unix seconds, request start
    request_id: str
    key_id: str | None
    user: str | None
    client_ip: str
    endpoint: str                    # "/v1/chat/completions", ...
    model: str | None                # as requested
    provider: str | None
    upstream_model: str | None
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico: int | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cache_hit: bool = False
    error_code: str | None = None


@dataclass(slots=True)
class UsageRow:
    day: str                         # "YYYY-MM-DD" (UTC)
    key_id: str | None
    model: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int


class AuditSink(Protocol):
    def submit(self, record: AuditRecord) -> None:
        """Hand one record over without waiting (a bounded in-memory queue, then batches
        written off the hot path; to the disk spool when the database is down)."""

    async def run(self) -> None:
        """The writer task: batches, writes, spools, replays.  Runs until cancelled,
        then flushes what it holds (to the database or the spool) before returning."""

    async def usage(self, *, key_id: str | None = None, model: str | None = None,
                    since: str | None = None, until: str | None = None) -> list[UsageRow]:
        """Daily rollups per key and model (never a scan of raw rows)."""

    async def spend_pico(self, key_id: str) -> int:
        """Total recorded spend of a key."""

    def statistics(self) -> dict[str, Any]: ...


class LimitStore(Protocol):
    """Token buckets shared by every worker and instance (Redis); the in-process table
    is ``gwnative.TokenBuckets`` directly.  Same decisions as TokenBuckets.acquire."""

    async def acquire(self, key: str, cost: float, now: float, capacity: float,
                      refill_per_s: float) -> Any: ...

    async def refund(self, key: str, amount: float, now: float, capacity: float,
                     refill_per_s: float) -> float: ...


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
