"""What the SQL stores (SQLite, Postgres) share: the audit writer, batch rollups, the
lookup-name cache, migration files and key fields.

How the audit writer works: ``submit`` appends to an in-memory list and returns (it
never waits and never raises).  ``run`` wakes ``flush_s`` after the first record of
a batch (it sleeps while it has nothing to write) or as soon as ``batch_size`` records
wait, cuts them into batches (each with a fresh id and the next
spool sequence number) and writes each batch in one transaction: its rows, its daily
rollups, the keys' spend and its id in ``audit_batches``, so a batch whose id is already
there is skipped and nothing is counted twice.  When a write fails the batch goes to the
disk spool (``spool.py``) and so does every later batch while any file is waiting,
which keeps the order; the spool is replayed, oldest first, with a doubling backoff
until the database answers.  If more than ``max_buffer`` records pile up (the writer
cannot keep up), ``submit`` spools them at once rather than drop them.  On cancellation
``run`` writes what it holds, to the database if it was answering, else (or on timeout)
to the spool, inside a shielded scope bounded by ``shutdown_timeout_s``.

    state     event                          action                          next
    direct    batch ready                    write it                        direct
    direct    write fails                    spool it; log "spooling"        spooling
    spooling  batch ready                    spool it (behind older files)   spooling
    spooling  retry due                      replay files in order           direct when
                                                                             all committed
    spooling  a replay fails                 backoff doubles (to retry_max_s) spooling
    any       buffer >= max_buffer (submit)  spool the buffer now            spooling
    any       cancelled                      shielded flush: DB, else spool  (returns)

``db_ok`` is False from a failed write until the next successful one; the switch each
way is one structured log line.
"""
from __future__ import annotations

import functools
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import trio

from gwcore.accesslog import event
from gwcore.ports import AuditRecord, KeyRecord, UsageRow
from gwcore.stores.spool import Batch, Spool

# Lookup-name kinds: one small table keeps every repeated string of the audit rows.
ENDPOINT, MODEL, PROVIDER, ERROR_CODE = 1, 2, 3, 4

# Fields KeyStore.update may change (ports.KeyStore.update).
UPDATABLE_KEY_FIELDS = frozenset({"name", "models", "rpm", "tpm", "max_concurrency",
                                  "budget_pico", "expires_at", "metadata"})

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------- time


def to_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def from_us(us: int) -> float:
    return us / 1_000_000


def to_datetime(seconds: float) -> datetime:
    # Through integer microseconds: exact, where datetime.fromtimestamp would round.
    return EPOCH + timedelta(microseconds=to_us(seconds))


def from_datetime(dt: datetime) -> float:
    delta = dt - EPOCH
    return from_us((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)


def utc_day(seconds: float) -> date:
    return _day(int(seconds // 86_400))


@functools.lru_cache(maxsize=64)
def _day(days_since_epoch: int) -> date:
    return EPOCH.date() + timedelta(days=days_since_epoch)


def day_start_us(day: date) -> int:
    return (day - EPOCH.date()).days * 86_400 * 1_000_000


def check_key_changes(changes: dict[str, Any]) -> None:
    unknown = set(changes) - UPDATABLE_KEY_FIELDS
    if unknown:
        raise ValueError("cannot change " + ", ".join(sorted(unknown)))


class KeyExists(ValueError):
    """create_key with an id or key hash that is already stored."""


# ---------------------------------------------------------------------------- batches


def names_of(record: AuditRecord) -> Iterable[tuple[int, str]]:
    yield ENDPOINT, record.endpoint
    if record.model is not None:
        yield MODEL, record.model
    if record.upstream_model is not None:
        yield MODEL, record.upstream_model
    if record.provider is not None:
        yield PROVIDER, record.provider
    if record.error_code is not None:
        yield ERROR_CODE, record.error_code


@dataclass(slots=True)
class Rollup:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_pico: int = 0


def rollups(records: Iterable[AuditRecord]) -> dict[tuple[date, str, str], Rollup]:
    """Per (UTC day, key id or "", requested model or ""): what the batch adds."""
    out: dict[tuple[date, str, str], Rollup] = {}
    for r in records:
        k = (utc_day(r.ts), r.key_id or "", r.model or "")
        u = out.get(k)
        if u is None:
            u = out[k] = Rollup()
        u.requests += 1
        u.prompt_tokens += r.prompt_tokens
        u.completion_tokens += r.completion_tokens
        u.cost_pico += r.cost_pico or 0
    return out


def spend(records: Iterable[AuditRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.key_id is not None and r.cost_pico:
            out[r.key_id] = out.get(r.key_id, 0) + r.cost_pico
    return out


# Names held in memory by each store: far more than a deployment's model names, error
# codes and endpoints; it is a bound because requested model names (404s included) and
# upstream error codes come from outside, and a client inventing names must not grow
# the gateway's memory without end.  A name that fell out is looked up again.
MAX_CACHED_NAMES = 20_000


class NameCache:
    """(kind, name) -> id, filled from the names table; least recently used out past
    ``max_entries``.  Updated only after the transaction that inserted a name
    committed, so it never holds a rolled-back id."""

    def __init__(self, max_entries: int = MAX_CACHED_NAMES) -> None:
        self.ids: OrderedDict[tuple[int, str], int] = OrderedDict()
        self.max_entries = max_entries

    def split(self, records: Iterable[AuditRecord]
              ) -> tuple[dict[tuple[int, str], int], set[tuple[int, str]]]:
        """For one batch: the ids known here (a copy of just this batch's names, so a
        later eviction cannot take one away mid-write) and the names to look up."""
        ids = self.ids
        known: dict[tuple[int, str], int] = {}
        missing: set[tuple[int, str]] = set()
        for r in records:
            for n in names_of(r):
                if n in known or n in missing:
                    continue
                i = ids.get(n)
                if i is None:
                    missing.add(n)
                else:
                    known[n] = i
                    ids.move_to_end(n)
        return known, missing

    def missing(self, records: Iterable[AuditRecord]) -> set[tuple[int, str]]:
        return self.split(records)[1]

    def update(self, found: dict[tuple[int, str], int]) -> None:
        ids = self.ids
        for n, i in found.items():
            ids[n] = i
            ids.move_to_end(n)
        while len(ids) > self.max_entries:
            ids.popitem(last=False)


# ---------------------------------------------------------------------------- migrations


def load_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for ``migrations/<dialect>/NNNN_*.sql``, in order."""
    folder = resources.files("gwcore.stores").joinpath("migrations", dialect)
    out = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            out.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    out.sort()
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {dialect} migrations share a version: {versions}")
    return out


# ---------------------------------------------------------------------------- the writer


class BatchBackend(Protocol):
    async def write_batch(self, batch: Batch) -> bool:
        """Commit the batch; False when its id was already committed (nothing written)."""

    def is_unavailable(self, exc: Exception) -> bool:
        """The database did not answer (as opposed to refusing this batch)."""

    async def maintain(self, now: float) -> None:
        """Partitions ahead, retention."""


class AuditWriter:
    def __init__(self, backend: BatchBackend, spool_dir: str | Path, *, store: str,
                 flush_s: float = 0.5, batch_size: int = 500, max_buffer: int = 100_000,
                 retry_initial_s: float = 0.5, retry_max_s: float = 30.0,
                 shutdown_timeout_s: float = 5.0, maintenance_s: float = 3600.0,
                 max_refusals: int = 3) -> None:
        self.backend = backend
        self.spool_dir = Path(spool_dir)
        self.store = store
        self.flush_s = flush_s
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.maintenance_s = maintenance_s
        self.max_refusals = max_refusals
        self.spool: Spool | None = None
        self._spool_path = self.spool_dir   # the directory claimed (maybe a w<N> one)
        self._buffer: list[AuditRecord] = []
        self._pending: list[Batch] = []      # cut from the buffer, not yet committed/spooled
        self._wake = trio.Event()
        self._asleep = False  # run() waits for a first record (nothing else to do)
        self._step_lock = trio.Lock()
        self._retry_at = -math.inf
        self._backoff_s = 0.0
        self._maintain_at = -math.inf
        self._refusals: dict[int, int] = {}  # spool seq -> refusals (not outages)
        self.db_ok = True
        self.submitted = 0
        self.written = 0          # records committed (directly or replayed)
        self.spooled = 0          # records written to spool files
        self.replayed = 0         # records committed from spool files
        self.duplicates = 0       # records of batches skipped as already committed
        self.batches = 0          # batches committed
        self.last_error: str | None = None

    # -- the hot path

    def submit(self, record: AuditRecord) -> None:
        try:
            self._buffer.append(record)
            self.submitted += 1
            n = len(self._buffer)
            if n >= self.batch_size or self._asleep:
                self._wake.set()
            if n >= self.max_buffer:
                self._spool_buffer_now()
        except Exception as exc:  # never raise into a request; the record stays buffered
            self._note(exc)

    def _spool_buffer_now(self) -> None:
        """The writer is behind by ``max_buffer`` records: spool them, synchronously.
        (Only on overload; disk is the bound, not memory.)"""
        spool = self._open_spool()
        records, self._buffer = self._buffer, []
        for i in range(0, len(records), self.batch_size):
            batch = Batch(uuid.uuid4().hex, spool.next_seq(), records[i:i + self.batch_size])
            try:
                spool.write(batch)
            except OSError as exc:  # keep what the disk would not take
                self._buffer[:0] = records[i:]
                self._note(exc)
                return
            self.spooled += len(batch.records)
        self._retry_at = -math.inf

    # -- the writer task

    def _open_spool(self) -> Spool:
        if self.spool is None:
            self.spool = Spool(self.spool_dir)
            self._spool_path = self.spool.dir
        return self.spool

    async def run(self) -> None:
        # An unusable spool directory is a startup error, not something to find out
        # during the first outage.
        await trio.to_thread.run_sync(self._open_spool)
        try:
            await self.flush(replay=True)        # an earlier process's spool first
            while True:
                await self._maintain()
                await self._wait()
                await self.flush(replay=trio.current_time() >= self._retry_at)
        finally:
            with trio.move_on_after(self.shutdown_timeout_s, shield=True):
                await self._flush_at_shutdown()
            self._spool_what_is_left()

    async def _wait(self) -> None:
        if len(self._buffer) >= self.batch_size:
            await trio.lowlevel.checkpoint()
            return
        if not self._buffer and not self._pending and \
                not (self.spool is not None and self.spool.count()):
            # Nothing to write or replay: sleep until a record comes (or maintenance is
            # due), then give the batch its flush_s to fill as usual.
            self._asleep = True
            with trio.move_on_at(self._maintain_at):
                await self._wake.wait()
            self._asleep = False
            self._wake = trio.Event()
            if not self._buffer:
                return
        timeout = self.flush_s
        if self.spool is not None and self.spool.count():
            timeout = min(timeout, max(0.0, self._retry_at - trio.current_time()))
        with trio.move_on_after(timeout):
            await self._wake.wait()
        self._wake = trio.Event()

    async def flush(self, *, replay: bool = True) -> None:
        """Write what is buffered now (tests and the CLI call it; ``run`` loops on it)."""
        async with self._step_lock:
            try:
                await self._step(replay)
            except Exception as exc:  # a bug here must not end the writer; it retries
                self._note(exc)
                self._failed()

    async def _step(self, replay: bool) -> None:
        spool = self._open_spool()
        self._cut_batches(spool)
        while self._pending:
            batch = self._pending[0]
            if not spool.count() and await self._write(batch):
                self._pending.pop(0)
                continue
            try:
                await trio.to_thread.run_sync(spool.write, batch)
            except OSError as exc:  # disk full: the batch stays pending, tried again later
                self._note(exc)
                self._retry_at = trio.current_time() + max(self._backoff_s, self.retry_initial_s)
                return
            self._pending.pop(0)
            self.spooled += len(batch.records)
        if replay and spool.count():
            await self._replay(spool)

    async def _maintain(self) -> None:
        now = trio.current_time()
        if now < self._maintain_at:
            return
        self._maintain_at = now + self.maintenance_s
        try:
            await self.backend.maintain(time.time())
        except Exception as exc:  # retried next time; the audit rows go on regardless
            self._note(exc)

    def _cut_batches(self, spool: Spool) -> None:
        records, self._buffer = self._buffer, []
        for i in range(0, len(records), self.batch_size):
            self._pending.append(Batch(uuid.uuid4().hex, spool.next_seq(),
                                       records[i:i + self.batch_size]))

    async def _write(self, batch: Batch) -> bool:
        try:
            fresh = await self.backend.write_batch(batch)
        except Exception as exc:
            self._note(exc)
            self._failed()
            return False
        self._committed(batch, fresh)
        return True

    def _committed(self, batch: Batch, fresh: bool) -> None:
        if fresh:
            self.written += len(batch.records)
            self.batches += 1
        else:
            self.duplicates += len(batch.records)
        if not self.db_ok:
            self.db_ok = True
            event("audit database answers again; replaying the spool", store=self.store,
                  spool_files=self.spool.count() if self.spool else 0)
        self._backoff_s = 0.0

    def _failed(self) -> None:
        if self.db_ok:
            self.db_ok = False
            event("audit database unreachable; spooling audit records", store=self.store,
                  spool_dir=str(self.spool.dir if self.spool else self.spool_dir),
                  error=self.last_error)
        self._backoff_s = min(self.retry_max_s, max(self.retry_initial_s, self._backoff_s * 2))
        self._retry_at = trio.current_time() + self._backoff_s

    async def _replay(self, spool: Spool) -> None:
        for seq in spool.pending():
            try:
                batch = await trio.to_thread.run_sync(spool.read, seq)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._note(exc)
                where = await trio.to_thread.run_sync(spool.reject, seq)
                event("audit spool file unreadable; set aside", file=str(where), error=str(exc))
                continue
            try:
                fresh = await self.backend.write_batch(batch)
            except Exception as exc:
                self._note(exc)
                self._failed()
                if not self.backend.is_unavailable(exc):
                    n = self._refusals[seq] = self._refusals.get(seq, 0) + 1
                    if n >= self.max_refusals:  # the database answers but refuses it
                        where = await trio.to_thread.run_sync(spool.reject, seq)
                        self._refusals.pop(seq, None)
                        event("audit batch refused by the database; set aside",
                              file=str(where), error=self.last_error)
                return
            await trio.to_thread.run_sync(spool.remove, seq)
            self._refusals.pop(seq, None)
            self._committed(batch, fresh)
            if fresh:
                self.replayed += len(batch.records)

    async def _flush_at_shutdown(self) -> None:
        spool = self._open_spool()
        self._cut_batches(spool)
        while self._pending:
            batch = self._pending[0]
            done = False
            if self.db_ok and not spool.count():
                with trio.move_on_after(self.shutdown_timeout_s / 2):
                    done = await self._write(batch)
            if not done:
                # Maybe committed after all (a write cut short): its id makes the
                # replay a no-op then.
                try:
                    await trio.to_thread.run_sync(spool.write, batch)
                except OSError as exc:
                    self._note(exc)
                    return  # _spool_what_is_left tries once more
                self.spooled += len(batch.records)
            self._pending.pop(0)

    def _spool_what_is_left(self) -> None:
        """Past the shutdown timeout: straight to disk, synchronously."""
        if not self._pending and not self._buffer:
            self._close_spool()
            return
        try:
            spool = self._open_spool()
            self._cut_batches(spool)
            while self._pending:
                spool.write(self._pending[0])
                self.spooled += len(self._pending.pop(0).records)
        except Exception as exc:
            self._note(exc)
            lost = len(self._buffer) + sum(len(b.records) for b in self._pending)
            event("audit records lost at shutdown", records=lost, error=self.last_error)
        self._close_spool()

    def _close_spool(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def close(self) -> None:
        self._close_spool()

    def _note(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}".strip()[:500]

    def statistics(self) -> dict[str, Any]:
        return {
            "audit_submitted": self.submitted,
            "audit_written": self.written,
            "audit_spooled": self.spooled,
            "audit_replayed": self.replayed,
            "audit_duplicates_skipped": self.duplicates,
            "audit_batches": self.batches,
            "audit_buffered": len(self._buffer) + sum(len(b.records) for b in self._pending),
            "spool_files": self.spool.count() if self.spool else _count_files(self._spool_path),
            "spool_rejected": self.spool.rejected if self.spool else 0,
            "last_error": self.last_error,
            "db_ok": self.db_ok,
        }


def _count_files(directory: Path) -> int:
    try:
        return sum(1 for _ in directory.glob("*.batch"))
    except OSError:
        return 0


# The audit writer's thread runs at this nice value (19: the lowest priority).
WRITER_NICE = 19
# A batch whose first record was submitted longer ago than this is behind: it is written
# at the normal priority (trio's thread cache), so a saturated worker's audit cannot fall
# behind for good.
WRITER_BEHIND_S = 2.0


class WriterThread:
    """One long-lived thread, at the lowest CPU priority, for the audit batches.

    The batches are the only sizeable work no request waits for.  In trio's thread
    cache, at the normal priority, a flush (a few ms of SQLite work every 0.5 s) held
    the worker's core while requests arrived: on one core, the c=1 p99 went from about
    0.8 ms to 2 ms.  Niced to 19, the kernel lets a request's wake-up preempt it.  On a
    core that requests keep busy it gets too little (1.5%) to keep up with them, so a
    batch that is behind (its first record submitted ``WRITER_BEHIND_S`` ago) goes through
    trio's thread cache at the normal priority instead (``SQLStoreBase.write_batch``).
    Key lookups and the rest always use trio's thread cache.  ``niced`` is False where
    the priority could not be lowered (the thread then runs at the normal one).
    """

    def __init__(self, name: str, nice: int = WRITER_NICE) -> None:
        self.name = name
        self.nice = nice
        self.niced: bool | None = None  # known once the thread has started
        self.jobs = 0  # calls run
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _main(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            self.niced = True
        except (OSError, AttributeError):  # not permitted, or not a platform that has it
            self.niced = False
        while (job := self._jobs.get()) is not None:
            job()

    async def run_sync(self, fn: Callable[..., Any], *args: Any,
                       abandon_on_cancel: bool = False) -> Any:
        """``fn(*args)`` in this thread, as ``trio.to_thread.run_sync`` would: the caller
        waits for it, also when cancelled unless ``abandon_on_cancel``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[tuple[bool, Any]] = []  # (returned, its value or exception)

        def job() -> None:
            self.jobs += 1
            try:
                result.append((True, fn(*args)))
            except BaseException as exc:  # raised in the caller, as to_thread does
                result.append((False, exc))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                return  # the caller's run is over: nobody waits for this result

        self._jobs.put(job)
        with trio.CancelScope(shield=not abandon_on_cancel):
            await done.wait()
        returned, value = result[0]
        if not returned:
            raise value
        return value

    def close(self) -> None:
        """The thread ends after the jobs already queued."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


class SQLStoreBase:
    """What the SQLite and Postgres stores share: the ports' async methods, each running
    its backend's ``_*_sync`` twin in a worker thread through ``_call``, and the audit
    writer's delegation.  Subclasses provide ``_call``, the ``_*_sync`` methods (their
    SQL dialect), ``migrate`` and ``close``."""

    _writer: AuditWriter
    _writes: WriterThread  # where the audit batches are written

    async def _call(self, fn: Callable[..., Any], *args: Any,
                    on: WriterThread | None = None) -> Any:
        """``fn(connection, *args)`` in a worker thread (``on``, else trio's cache)."""
        raise NotImplementedError

    async def migrate(self) -> list[int]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        await self.migrate()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- KeyStore
    async def create_key(self, record: KeyRecord) -> None:
        await self._call(self._create_key_sync, record)  # type: ignore[attr-defined]

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._call(self._get_sync, "k.key_hash", key_hash)  # type: ignore[attr-defined]

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._call(self._get_sync, "k.id", key_id)  # type: ignore[attr-defined]

    async def list_keys(self) -> list[KeyRecord]:
        return await self._call(self._list_sync)  # type: ignore[attr-defined]

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        check_key_changes(changes)
        return await self._call(self._update_sync, key_id, changes)  # type: ignore[attr-defined]

    async def revoke(self, key_id: str, now: float) -> bool:
        """True when the key exists (revoked now, or earlier: the first time is kept)."""
        return await self._call(self._revoke_sync, key_id, now)  # type: ignore[attr-defined]

    # -- AuditSink
    def submit(self, record: AuditRecord) -> None:
        self._writer.submit(record)

    async def run(self) -> None:
        await self._writer.run()

    async def flush(self) -> None:
        """Write what is buffered now, and replay the spool (tests, the CLI)."""
        await self._writer.flush()

    def statistics(self) -> dict[str, Any]:
        return self._writer.statistics()

    async def usage(self, *, key_id: str | None = None, model: str | None = None,
                    since: str | None = None, until: str | None = None) -> list[UsageRow]:
        return await self._call(self._usage_sync, key_id, model, since, until)  # type: ignore[attr-defined]

    async def spend_pico(self, key_id: str) -> int:
        return await self._call(self._spend_sync, key_id)  # type: ignore[attr-defined]

    # -- the writer's backend
    async def write_batch(self, batch: Any) -> bool:
        # A record is submitted when its request ends: ts (its start) plus its latency.
        first = batch.records[0] if batch.records else None
        behind = first is not None and \
            time.time() - first.ts - first.latency_ms / 1000 > WRITER_BEHIND_S
        return await self._call(self._write_batch_sync, batch,  # type: ignore[attr-defined]
                                on=None if behind else self._writes)

    async def audit_rows(self) -> list[AuditRecord]:
        """Every audit row, decoded back into records, oldest first (tests, exports)."""
        return await self._call(self._audit_rows_sync)  # type: ignore[attr-defined]
