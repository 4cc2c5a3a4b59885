"""KeyStore and AuditSink on Postgres (psycopg 3, its sync API in worker threads).

How this works: a small pool of autocommit connections, each used by one worker thread
at a time; ``trio.CapacityLimiter(pool_size)`` bounds the threads, so it bounds the
connections too.  A connection that broke is dropped; a call that failed on a reused
connection (the server restarted since) is tried once more on a fresh one.  Threads
are abandoned on cancellation (``abandon_on_cancel``): each holds its own connection,
and a batch whose fate is then unknown is spooled, where its id makes a second write a
no-op.

The audit log is partitioned by UTC day (``audit_log_pYYYYMMDD``).  Partitions for
today and tomorrow are made at start and by ``maintain`` (hourly, from the writer), and
on demand for any other day a batch holds (a replayed spool), each in its own short
transaction under an advisory lock, since ``CREATE TABLE ... PARTITION OF`` locks the
parent.  A batch is one transaction: its id into ``audit_batches`` (``ON CONFLICT DO
NOTHING``: a known id means skip), its rows with ``COPY``, its rollups and the keys'
spend upserted adding.  Retention drops whole partitions, never DELETE + VACUUM.
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import errors, sql
from psycopg.types.json import Jsonb

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
    from_datetime,
    load_migrations,
    rollups,
    spend,
    to_datetime,
    utc_day,
)
from gwcore.stores.spool import Batch

T = TypeVar("T")

# Advisory lock ids ("gw" + a number): migrations, partition DDL.
MIGRATE_LOCK = 0x6777_0001
PARTITION_LOCK = 0x6777_0002
PARTITION_RE = re.compile(r"^audit_log_p(\d{8})$")

_KEY_COLUMNS = ("id, name, key_hash, prefix, models, rpm, tpm, max_concurrency, budget_pico,"
                " expires_at, metadata, created_at, revoked_at")
_SELECT_KEY = (f"SELECT {', '.join('k.' + c.strip() for c in _KEY_COLUMNS.split(','))},"
               " COALESCE(s.cost_pico, 0) FROM api_keys k"
               " LEFT JOIN key_spend s ON s.key_id = k.id")
_AUDIT_COLUMNS = ("ts, cost_pico, latency_us, ttft_us, endpoint_id, model_id, provider_id,"
                  " upstream_model_id, error_code_id, prompt_tokens, completion_tokens,"
                  " cached_tokens, reasoning_tokens, status, cache_hit, request_id, key_id,"
                  " user_name, client_ip")
# COPY's binary format: no text rendering and parsing of every value on either side.
_AUDIT_TYPES = ["timestamptz", "int8", "int8", "int8", "int4", "int4", "int4", "int4", "int4",
                "int4", "int4", "int4", "int4", "int2", "bool", "text", "text", "text", "text"]
_UPSERT_USAGE = ("INSERT INTO usage_daily (day, key_id, model_id, requests, prompt_tokens,"
                 " completion_tokens, cost_pico) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                 " ON CONFLICT (day, key_id, model_id) DO UPDATE SET"
                 " requests = usage_daily.requests + EXCLUDED.requests,"
                 " prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,"
                 " completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,"
                 " cost_pico = usage_daily.cost_pico + EXCLUDED.cost_pico")
_UPSERT_SPEND = ("INSERT INTO key_spend (key_id, cost_pico) VALUES (%s, %s)"
                 " ON CONFLICT (key_id) DO UPDATE SET"
                 " cost_pico = key_spend.cost_pico + EXCLUDED.cost_pico")


class _Pool:
    """Idle connections; the CapacityLimiter in front bounds how many exist."""

    def __init__(self, dsn: str, connect_timeout_s: int) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[psycopg.Connection[Any]] = []
        self._mutex = threading.Lock()
        self.closed = False

    def get(self) -> tuple[psycopg.Connection[Any], bool]:
        with self._mutex:
            if self._idle:
                return self._idle.pop(), True
        conn = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s,
            application_name="gwcore",
            # A dead peer is noticed within a minute rather than the kernel's hours.
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        return conn, False

    def put(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken or self.closed \
                or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
            return
        with self._mutex:
            self._idle.append(conn)

    def close(self) -> None:
        with self._mutex:
            self.closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresStore(SQLStoreBase):
    """``ports.KeyStore`` and ``ports.AuditSink`` on Postgres."""

    def __init__(self, dsn: str, *, spool_dir: str | Path = "data/spool",
                 retention_days: int = 30, pool_size: int = 4, connect_timeout_s: int = 5,
                 flush_s: float = 0.5, batch_size: int = 500, max_buffer: int = 100_000,
                 retry_max_s: float = 30.0, shutdown_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.retention_days = retention_days
        self._pool = _Pool(dsn, connect_timeout_s)
        self._limiter = trio.CapacityLimiter(pool_size)
        self._names = NameCache()
        self._names_lock = threading.Lock()
        self._days: set[date] = set()       # partitions known to exist
        self._migrated = False
        self._writes = WriterThread("gwcore-audit-postgres")
        self._writer = AuditWriter(
            self, spool_dir, store="postgres", flush_s=flush_s, batch_size=batch_size,
            max_buffer=max_buffer, retry_max_s=retry_max_s,
            shutdown_timeout_s=shutdown_timeout_s)

    # -- lifecycle

    async def migrate(self) -> list[int]:
        """Apply pending migrations (idempotent; one process at a time through an
        advisory lock), load the name cache, make today's and tomorrow's partitions.
        Returns the versions applied by this call."""
        applied = await self._call(self._migrate_sync)
        await self._call(self._ensure_partitions_sync, _days_ahead(time.time()))
        return applied

    async def close(self) -> None:
        self._writer.close()
        self._writes.close()
        self._pool.close()

    async def _call(self, fn: Callable[..., T], *args: Any, on: WriterThread | None = None) -> T:
        if on is not None:
            return await on.run_sync(self._in_thread, fn, args, abandon_on_cancel=True)
        return await trio.to_thread.run_sync(self._in_thread, fn, args, limiter=self._limiter,
                                             abandon_on_cancel=True)

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        for attempt in (1, 2):
            conn, reused = self._pool.get()
            try:
                if not self._migrated and fn != self._migrate_sync:
                    self._migrate_sync(conn)
                result = fn(conn, *args)
            except psycopg.OperationalError:
                self._pool.put(conn)  # closes it when broken
                if reused and conn.broken and attempt == 1:
                    continue  # a stale connection from before a restart: once more
                raise
            except BaseException:
                self._pool.put(conn)
                raise
            self._pool.put(conn)
            return result
        raise AssertionError("unreachable")

    def _migrate_sync(self, conn: psycopg.Connection[Any]) -> list[int]:
        applied = []
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                         " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, script in load_migrations("postgres"):
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(script)  # type: ignore[arg-type]  # a file: no parameters
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                 (version, name))
                applied.append(version)
        finally:
            if not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
        rows = conn.execute("SELECT id, kind, name FROM names ORDER BY id DESC LIMIT %s",
                            (self._names.max_entries,)).fetchall()
        rows.reverse()  # the newest names are the most recently used
        with self._names_lock:
            self._names.update({(k, n): i for i, k, n in rows})
        self._days = set(self._partitions_sync(conn))
        self._migrated = True
        return applied

    # -- KeyStore

    def _create_key_sync(self, conn: psycopg.Connection[Any], r: KeyRecord) -> None:
        try:
            conn.execute(
                f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (r.id, r.name, r.key_hash, r.prefix, r.models, r.rpm, r.tpm, r.max_concurrency,
                 r.budget_pico, _dt_or_none(r.expires_at), Jsonb(r.metadata),
                 to_datetime(r.created_at), _dt_or_none(r.revoked_at)))
        except errors.UniqueViolation as exc:
            raise KeyExists(f"a key with id {r.id!r} or this key hash exists") from exc

    def _get_sync(self, conn: psycopg.Connection[Any], column: str,
                  value: str) -> KeyRecord | None:
        row = conn.execute(f"{_SELECT_KEY} WHERE {column} = %s", (value,)).fetchone()  # type: ignore[arg-type]
        return None if row is None else _key(row)

    def _list_sync(self, conn: psycopg.Connection[Any]) -> list[KeyRecord]:
        return [_key(r) for r in conn.execute(f"{_SELECT_KEY} ORDER BY k.created_at, k.id")]  # type: ignore[arg-type]

    def _update_sync(self, conn: psycopg.Connection[Any], key_id: str,
                     changes: dict[str, Any]) -> KeyRecord | None:
        sets, values = [], []
        for field, value in changes.items():
            if field == "metadata":
                value = Jsonb(value or {})
            elif field == "expires_at":
                value = _dt_or_none(value)
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(field)))
            values.append(value)
        if sets:
            conn.execute(sql.SQL("UPDATE api_keys SET {} WHERE id = %s").format(
                sql.SQL(", ").join(sets)), (*values, key_id))
        return self._get_sync(conn, "k.id", key_id)

    def _revoke_sync(self, conn: psycopg.Connection[Any], key_id: str, now: float) -> bool:
        cur = conn.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, %s)"
                           " WHERE id = %s", (to_datetime(now), key_id))
        return cur.rowcount > 0

    # -- AuditSink

    def _usage_sync(self, conn: psycopg.Connection[Any], key_id: str | None,
                    model: str | None, since: str | None, until: str | None) -> list[UsageRow]:
        where, args = [], []
        if key_id is not None:
            where.append("u.key_id = %s")
            args.append(key_id)
        if model is not None:
            where.append("n.name = %s")
            args.append(model)
        if since is not None:
            where.append("u.day >= %s")
            args.append(date.fromisoformat(since[:10]))
        if until is not None:
            where.append("u.day <= %s")
            args.append(date.fromisoformat(until[:10]))
        query = ("SELECT u.day, u.key_id, n.name, u.requests, u.prompt_tokens,"
                 " u.completion_tokens, u.cost_pico FROM usage_daily u"
                 f" LEFT JOIN names n ON n.id = u.model_id AND n.kind = {MODEL}")
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY u.day, u.key_id, n.name"
        return [UsageRow(day.isoformat(), k or None, m, req, p, c, cost)
                for day, k, m, req, p, c, cost in conn.execute(query, args)]  # type: ignore[arg-type]

    def _spend_sync(self, conn: psycopg.Connection[Any], key_id: str) -> int:
        row = conn.execute("SELECT cost_pico FROM key_spend WHERE key_id = %s", (key_id,)).fetchone()
        return 0 if row is None else int(row[0])

    # -- the writer's backend

    def is_unavailable(self, exc: Exception) -> bool:
        # Connection refused or lost, server shutting down, disk full, too many clients.
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))

    def _write_batch_sync(self, conn: psycopg.Connection[Any], batch: Batch) -> bool:
        records = batch.records
        self._ensure_partitions_sync(conn, {utc_day(r.ts) for r in records})
        try:
            return self._write_rows(conn, batch, records)
        except errors.CheckViolation:
            # "no partition of relation found for row": another process's retention
            # dropped a partition we thought was there. Look again, once.
            self._days = set(self._partitions_sync(conn))
            self._ensure_partitions_sync(conn, {utc_day(r.ts) for r in records})
            return self._write_rows(conn, batch, records)

    def _write_rows(self, conn: psycopg.Connection[Any], batch: Batch,
                    records: list[AuditRecord]) -> bool:
        with conn.transaction():
            cur = conn.execute("INSERT INTO audit_batches (id, records) VALUES (%s, %s)"
                               " ON CONFLICT (id) DO NOTHING", (uuid.UUID(batch.id), len(records)))
            if cur.rowcount == 0:
                return False
            with self._names_lock:
                known, missing = self._names.split(records)
            found = self._resolve_names(conn, missing)
            ids = {**known, **found} if found else known
            with cur.copy(f"COPY audit_log ({_AUDIT_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_AUDIT_TYPES)
                for r in records:
                    copy.write_row(_audit_row(r, ids))
            cur.executemany(_UPSERT_USAGE, [
                (day, key, ids[(MODEL, model)] if model else 0, u.requests, u.prompt_tokens,
                 u.completion_tokens, u.cost_pico)
                for (day, key, model), u in sorted(rollups(records).items())])
            # Sorted: two writers adding to the same rows take their locks in one order.
            cur.executemany(_UPSERT_SPEND, sorted(spend(records).items()))
        if found:
            with self._names_lock:
                self._names.update(found)
        return True

    def _resolve_names(self, conn: psycopg.Connection[Any],
                       wanted: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
        missing = sorted(wanted)
        if not missing:
            return {}
        kinds = [k for k, _ in missing]
        names = [_clean(n) for _, n in missing]
        conn.execute("INSERT INTO names (kind, name) SELECT * FROM unnest(%s::smallint[], %s::text[])"
                     " ON CONFLICT (kind, name) DO NOTHING", (kinds, names))
        rows = conn.execute("SELECT n.id, n.kind, n.name FROM names n JOIN"
                            " unnest(%s::smallint[], %s::text[]) AS m(kind, name)"
                            " ON n.kind = m.kind AND n.name = m.name", (kinds, names)).fetchall()
        by_clean = {(k, n): i for i, k, n in rows}
        return {(k, n): by_clean[(k, _clean(n))] for k, n in missing}

    # -- partitions and retention

    def _partitions_sync(self, conn: psycopg.Connection[Any]) -> list[date]:
        rows = conn.execute("SELECT c.relname FROM pg_inherits i"
                            " JOIN pg_class c ON c.oid = i.inhrelid"
                            " WHERE i.inhparent = 'audit_log'::regclass").fetchall()
        out = []
        for (name,) in rows:
            m = PARTITION_RE.match(name)
            if m:
                out.append(datetime.strptime(m.group(1), "%Y%m%d").date())
        return sorted(out)

    def _ensure_partitions_sync(self, conn: psycopg.Connection[Any], days: set[date]) -> None:
        for day in sorted(days - self._days):
            start, end = day.isoformat(), (day + timedelta(days=1)).isoformat()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                conn.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF audit_log"
                    " FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(f"audit_log_p{day:%Y%m%d}"),
                        sql.Literal(f"{start} 00:00:00+00"), sql.Literal(f"{end} 00:00:00+00")))
            self._days.add(day)

    async def maintain(self, now: float) -> None:
        await self._call(self._ensure_partitions_sync, _days_ahead(now))
        await self.apply_retention(now)

    async def apply_retention(self, now: float) -> int:
        """Drop the day partitions older than ``retention_days`` before ``now``'s UTC
        day (and batch ids 30 days after that); returns the partitions dropped.
        Rollups and spend stay."""
        return await self._call(self._retention_sync, now)

    def _retention_sync(self, conn: psycopg.Connection[Any], now: float) -> int:
        cutoff = utc_day(now) - timedelta(days=self.retention_days)
        dropped = 0
        for day in self._partitions_sync(conn):
            if day >= cutoff:
                continue
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(f"audit_log_p{day:%Y%m%d}")))
            self._days.discard(day)
            dropped += 1
        # Batch ids are kept 30 days longer than rows: a spool file replayed that late
        # still finds its id.
        conn.execute("DELETE FROM audit_batches WHERE committed_at < %s",
                     (to_datetime(now) - timedelta(days=self.retention_days + 30),))
        return dropped

    # -- for tests and tools

    def _audit_rows_sync(self, conn: psycopg.Connection[Any]) -> list[AuditRecord]:
        names = dict(conn.execute("SELECT id, name FROM names").fetchall())
        out = []
        for (ts, cost, lat, ttft, ep, model, prov, up, err, p, c, cached, reasoning, status,
             hit, rid, key, user, ip) in conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY ts, request_id"):  # type: ignore[arg-type]
            out.append(AuditRecord(
                ts=from_datetime(ts), request_id=rid, key_id=key, user=user, client_ip=ip,
                endpoint=names[ep], model=names.get(model), provider=names.get(prov),
                upstream_model=names.get(up), status=status, prompt_tokens=p,
                completion_tokens=c, cached_tokens=cached, reasoning_tokens=reasoning,
                cost_pico=cost, latency_ms=lat / 1000,
                ttft_ms=None if ttft is None else ttft / 1000, cache_hit=hit,
                error_code=names.get(err)))
        return out


def _days_ahead(now: float) -> set[date]:
    today = utc_day(now)
    return {today, today + timedelta(days=1)}


def _clean(s: str | None) -> str | None:
    # Postgres text cannot hold NUL; anything a client sent may.
    return s.replace("\x00", "\ufffd") if s and "\x00" in s else s


def _audit_row(r: AuditRecord, ids: dict[tuple[int, str], int]) -> tuple[Any, ...]:
    g = ids.get
    return (to_datetime(r.ts), r.cost_pico, round(r.latency_ms * 1000),
            None if r.ttft_ms is None else round(r.ttft_ms * 1000), ids[(ENDPOINT, r.endpoint)],
            g((MODEL, r.model)), g((PROVIDER, r.provider)), g((MODEL, r.upstream_model)),
            g((ERROR_CODE, r.error_code)), r.prompt_tokens, r.completion_tokens,
            r.cached_tokens, r.reasoning_tokens, r.status, r.cache_hit, _clean(r.request_id),
            _clean(r.key_id), _clean(r.user), _clean(r.client_ip))


def _key(row: tuple[Any, ...]) -> KeyRecord:
    (kid, name, key_hash, prefix, models, rpm, tpm, conc, budget, expires, meta, created,
     revoked, spent) = row
    return KeyRecord(id=kid, name=name, key_hash=key_hash, prefix=prefix, models=models,
                     rpm=rpm, tpm=tpm, max_concurrency=conc, budget_pico=budget,
                     spent_pico=int(spent), expires_at=_epoch_or_none(expires),
                     metadata=meta, created_at=from_datetime(created),
                     revoked_at=_epoch_or_none(revoked))


def _dt_or_none(seconds: float | None) -> datetime | None:
    return None if seconds is None else to_datetime(seconds)


def _epoch_or_none(dt: datetime | None) -> float | None:
    return None if dt is None else from_datetime(dt)
