"""KeyStore and AuditSink on one SQLite file (the embedded default).

How this works: one connection (``check_same_thread=False``, WAL, autocommit mode with
explicit ``BEGIN IMMEDIATE`` transactions) used from worker threads one call at a time
under a ``trio.Lock``, so the event loop never waits on the disk.  The audit writer
(``audit.py``) hands it batches; each is one transaction: the batch id into
``audit_batches`` (``INSERT OR IGNORE``: a known id means the batch is skipped), the rows
with executemany, the day/key/model rollups and the keys' spend, upserted adding.
Retention deletes rows older than ``retention_days`` (SQLite has no partitions).
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio

from gwcore.ports import AuditRecord, KeyRecord, UsageRow
from gwcore.stores.audit import (
    SQLStoreBase,
    WriterThread,
    ENDPOINT,
    ERROR_CODE,
    MODEL,
    PROVIDER,
    AuditWriter,
    KeyExists,
    NameCache,
    day_start_us,
    from_us,
    load_migrations,
    rollups,
    spend,
    to_us,
    utc_day,
)
from gwcore.stores.spool import Batch

T = TypeVar("T")

# 10 s: long enough for another process's migration or batch, short enough to surface
# a stuck writer as an error (and a spool) rather than a hang.
BUSY_TIMEOUT_MS = 10_000

_KEY_COLUMNS = ("id, name, key_hash, prefix, models, rpm, tpm, max_concurrency, budget_pico,"
                " expires_at_us, metadata, created_at_us, revoked_at_us")
_SELECT_KEY = (f"SELECT {', '.join('k.' + c.strip() for c in _KEY_COLUMNS.split(','))},"
               " COALESCE(s.cost_pico, 0) FROM api_keys k"
               " LEFT JOIN key_spend s ON s.key_id = k.id")
_INSERT_AUDIT = ("INSERT INTO audit_log (ts_us, request_id, key_id, user_name, client_ip,"
                 " endpoint_id, model_id, provider_id, upstream_model_id, status, prompt_tokens,"
                 " completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_us,"
                 " ttft_us, cache_hit, error_code_id)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_UPSERT_USAGE = ("INSERT INTO usage_daily (day, key_id, model_id, requests, prompt_tokens,"
                 " completion_tokens, cost_pico) VALUES (?,?,?,?,?,?,?)"
                 " ON CONFLICT (day, key_id, model_id) DO UPDATE SET"
                 " requests = requests + excluded.requests,"
                 " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                 " completion_tokens = completion_tokens + excluded.completion_tokens,"
                 " cost_pico = cost_pico + excluded.cost_pico")
_UPSERT_SPEND = ("INSERT INTO key_spend (key_id, cost_pico) VALUES (?, ?)"
                 " ON CONFLICT (key_id) DO UPDATE SET cost_pico = cost_pico + excluded.cost_pico")


def split_statements(script: str) -> list[str]:
    """Statements of a SQL file, so that they run inside our transaction
    (``executescript`` would commit first)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(ln.strip().startswith("--") or not ln.strip()
                               for ln in buf.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end: {buf.strip()[:80]!r}")
    return out


class SQLiteStore(SQLStoreBase):
    """``ports.KeyStore`` and ``ports.AuditSink`` on a SQLite file."""

    def __init__(self, path: str | Path = "data/gateway.db", *,
                 spool_dir: str | Path | None = None, retention_days: int = 30,
                 flush_s: float = 0.5, batch_size: int = 500, max_buffer: int = 100_000,
                 retry_max_s: float = 30.0, shutdown_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self._names = NameCache()
        self._migrated = False
        self._writes = WriterThread("gwcore-audit-sqlite")
        self._writer = AuditWriter(
            self, self.path.parent / "spool" if spool_dir is None else spool_dir,
            store="sqlite", flush_s=flush_s, batch_size=batch_size, max_buffer=max_buffer,
            retry_max_s=retry_max_s, shutdown_timeout_s=shutdown_timeout_s)

    # -- lifecycle

    async def migrate(self) -> list[int]:
        """Open the file (and its directory) and apply pending migrations; idempotent.
        Returns the versions applied by this call."""
        return await self._call(self._migrate_sync)

    async def close(self) -> None:
        self._writer.close()
        self._writes.close()
        async with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await trio.to_thread.run_sync(conn.close)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode: a commit survives a process crash; only a power
                # loss may take back the last transactions.
                conn.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _call(self, fn: Callable[..., T], *args: Any, on: WriterThread | None = None) -> T:
        async with self._lock:  # one connection: one thread at a time uses it
            if on is not None:
                return await on.run_sync(self._in_thread, fn, args)
            return await trio.to_thread.run_sync(self._in_thread, fn, args)

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._connect()
        if not self._migrated and fn != self._migrate_sync:
            self._migrate_sync(conn)
        return fn(conn, *args)

    def _migrate_sync(self, conn: sqlite3.Connection) -> list[int]:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_at_us INTEGER NOT NULL)")
        applied = []
        for version, name, sql in load_migrations("sqlite"):
            # BEGIN IMMEDIATE takes the write lock first, so two processes starting at
            # once apply each migration once: the second waits, then sees it applied.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?",
                                (version,)).fetchone() is None:
                    for statement in split_statements(sql):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                 (version, name, to_us(time.time())))
                    applied.append(version)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._migrated = True
        self._load_names(conn)
        return applied

    def _load_names(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT id, kind, name FROM names ORDER BY id DESC LIMIT ?",
                            (self._names.max_entries,)).fetchall()
        rows.reverse()  # the newest names are the most recently used
        self._names.update({(k, n): i for i, k, n in rows})

    # -- KeyStore

    def _create_key_sync(self, conn: sqlite3.Connection, r: KeyRecord) -> None:
        try:
            conn.execute(f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (r.id, r.name, r.key_hash, r.prefix, _json_or_none(r.models), r.rpm,
                          r.tpm, r.max_concurrency, r.budget_pico, _us_or_none(r.expires_at),
                          orjson.dumps(r.metadata).decode(), to_us(r.created_at),
                          _us_or_none(r.revoked_at)))
        except sqlite3.IntegrityError as exc:
            raise KeyExists(f"a key with id {r.id!r} or this key hash exists") from exc

    def _get_sync(self, conn: sqlite3.Connection, column: str, value: str) -> KeyRecord | None:
        row = conn.execute(f"{_SELECT_KEY} WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else _key(row)

    def _list_sync(self, conn: sqlite3.Connection) -> list[KeyRecord]:
        return [_key(r) for r in conn.execute(f"{_SELECT_KEY} ORDER BY k.created_at_us, k.id")]

    def _update_sync(self, conn: sqlite3.Connection, key_id: str,
                     changes: dict[str, Any]) -> KeyRecord | None:
        sets, values = [], []
        for field, value in changes.items():
            if field == "models":
                value = _json_or_none(value)
            elif field == "metadata":
                value = orjson.dumps(value or {}).decode()
            elif field == "expires_at":
                field, value = "expires_at_us", _us_or_none(value)
            sets.append(f"{field} = ?")
            values.append(value)
        if sets:
            conn.execute(f"UPDATE api_keys SET {', '.join(sets)} WHERE id = ?", (*values, key_id))
        return self._get_sync(conn, "k.id", key_id)

    def _revoke_sync(self, conn: sqlite3.Connection, key_id: str, now: float) -> bool:
        cur = conn.execute("UPDATE api_keys SET revoked_at_us = COALESCE(revoked_at_us, ?)"
                           " WHERE id = ?", (to_us(now), key_id))
        return cur.rowcount > 0

    # -- AuditSink

    def _usage_sync(self, conn: sqlite3.Connection, key_id: str | None, model: str | None,
                    since: str | None, until: str | None) -> list[UsageRow]:
        where, args = [], []
        if key_id is not None:
            where.append("u.key_id = ?")
            args.append(key_id)
        if model is not None:
            where.append("n.name = ?")
            args.append(model)
        if since is not None:
            where.append("u.day >= ?")
            args.append(since[:10])
        if until is not None:
            where.append("u.day <= ?")
            args.append(until[:10])
        sql = ("SELECT u.day, u.key_id, n.name, u.requests, u.prompt_tokens,"
               " u.completion_tokens, u.cost_pico FROM usage_daily u"
               f" LEFT JOIN names n ON n.id = u.model_id AND n.kind = {MODEL}")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY u.day, u.key_id, n.name"
        return [UsageRow(day, k or None, m, req, p, c, cost)
                for day, k, m, req, p, c, cost in conn.execute(sql, args)]

    def _spend_sync(self, conn: sqlite3.Connection, key_id: str) -> int:
        row = conn.execute("SELECT cost_pico FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
        return 0 if row is None else int(row[0])

    # -- the writer's backend

    def is_unavailable(self, exc: Exception) -> bool:
        # Locked, busy, disk I/O, disk full: the file did not take the batch this time.
        return isinstance(exc, sqlite3.OperationalError)

    def _write_batch_sync(self, conn: sqlite3.Connection, batch: Batch) -> bool:
        records = batch.records
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("INSERT OR IGNORE INTO audit_batches VALUES (?, ?, ?)",
                               (batch.id, len(records), to_us(time.time())))
            if cur.rowcount == 0:
                conn.execute("ROLLBACK")
                return False
            known, missing = self._names.split(records)
            found = self._resolve_names(conn, missing)
            ids = {**known, **found} if found else known
            conn.executemany(_INSERT_AUDIT, [_audit_row(r, ids) for r in records])
            conn.executemany(_UPSERT_USAGE, [
                (day.isoformat(), key, ids[(MODEL, model)] if model else 0, u.requests,
                 u.prompt_tokens, u.completion_tokens, u.cost_pico)
                for (day, key, model), u in rollups(records).items()])
            conn.executemany(_UPSERT_SPEND, list(spend(records).items()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if found:
            self._names.update(found)
        return True

    def _resolve_names(self, conn: sqlite3.Connection,
                       missing: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
        found = {}
        for kind, name in missing:
            conn.execute("INSERT OR IGNORE INTO names (kind, name) VALUES (?, ?)", (kind, name))
            (found[(kind, name)],) = conn.execute(
                "SELECT id FROM names WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return found

    async def maintain(self, now: float) -> None:
        await self.apply_retention(now)

    async def apply_retention(self, now: float) -> int:
        """Delete audit rows (and batch ids) of days older than ``retention_days``
        before ``now``'s UTC day; returns the audit rows deleted.  Rollups stay."""
        return await self._call(self._retention_sync, now)

    def _retention_sync(self, conn: sqlite3.Connection, now: float) -> int:
        cutoff = utc_day(now) - timedelta(days=self.retention_days)
        cutoff_us = day_start_us(cutoff)
        deleted = 0
        while True:  # in slices, so the write lock is never held for long
            cur = conn.execute("DELETE FROM audit_log WHERE rowid IN (SELECT rowid FROM audit_log"
                               " WHERE ts_us < ? LIMIT 10000)", (cutoff_us,))
            deleted += cur.rowcount
            if cur.rowcount < 10_000:
                break
        # Batch ids are kept 30 days longer than rows: a spool file replayed that late
        # still finds its id.
        conn.execute("DELETE FROM audit_batches WHERE committed_at_us < ?",
                     (day_start_us(cutoff - timedelta(days=30)),))
        return deleted

    # -- for tests and tools

    def _audit_rows_sync(self, conn: sqlite3.Connection) -> list[AuditRecord]:
        names = {i: n for i, n in conn.execute("SELECT id, name FROM names")}
        out = []
        for (ts, rid, key, user, ip, ep, model, prov, up, status, p, c, cached, reasoning,
             cost, lat, ttft, hit, err) in conn.execute("SELECT * FROM audit_log ORDER BY rowid"):
            out.append(AuditRecord(
                ts=from_us(ts), request_id=rid, key_id=key, user=user, client_ip=ip,
                endpoint=names[ep], model=names.get(model), provider=names.get(prov),
                upstream_model=names.get(up), status=status, prompt_tokens=p,
                completion_tokens=c, cached_tokens=cached, reasoning_tokens=reasoning,
                cost_pico=cost, latency_ms=lat / 1000, ttft_ms=None if ttft is None else ttft / 1000,
                cache_hit=bool(hit), error_code=names.get(err)))
        return out


def _audit_row(r: AuditRecord, ids: dict[tuple[int, str], int]) -> tuple[Any, ...]:
    g = ids.get
    return (to_us(r.ts), r.request_id, r.key_id, r.user, r.client_ip, ids[(ENDPOINT, r.endpoint)],
            g((MODEL, r.model)), g((PROVIDER, r.provider)), g((MODEL, r.upstream_model)), r.status,
            r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.reasoning_tokens,
            r.cost_pico, round(r.latency_ms * 1000),
            None if r.ttft_ms is None else round(r.ttft_ms * 1000), int(r.cache_hit),
            g((ERROR_CODE, r.error_code)))


def _key(row: tuple[Any, ...]) -> KeyRecord:
    (kid, name, key_hash, prefix, models, rpm, tpm, conc, budget, expires, meta, created,
     revoked, spent) = row
    return KeyRecord(id=kid, name=name, key_hash=key_hash, prefix=prefix,
                     models=None if models is None else orjson.loads(models), rpm=rpm, tpm=tpm,
                     max_concurrency=conc, budget_pico=budget, spent_pico=int(spent),
                     expires_at=None if expires is None else from_us(expires),
                     metadata=orjson.loads(meta), created_at=from_us(created),
                     revoked_at=None if revoked is None else from_us(revoked))


def _json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _us_or_none(seconds: float | None) -> int | None:
    return None if seconds is None else to_us(seconds)
