"""The same behaviour, on a SQLite file and on a real Postgres."""
from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import pytest
import trio

from gwcore.ports import KeyRecord
from gwcore.stores.audit import KeyExists
from gwcore.stores.spool import Batch, Spool
from tests.stores.helpers import DAY, NOW, make_record, running, wait_until


def key(n: int, **kw: object) -> KeyRecord:
    secret = f"gw-secret-{n}"
    base: dict[str, object] = dict(
        id=f"key_{n:016x}", name=f"team-{n}", key_hash=hashlib.sha256(secret.encode()).hexdigest(),
        prefix=secret[:7], created_at=NOW + n)
    base.update(kw)
    return KeyRecord(**base)  # type: ignore[arg-type]


def day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


# ---------------------------------------------------------------------------- keys


async def test_a_key_is_created_found_listed_updated_and_revoked(stores):
    store = await stores.open()
    full = key(1, models=["gpt-4o", "claude-3-5-haiku"], rpm=60, tpm=10_000,
               max_concurrency=4, budget_pico=50 * 10**12, expires_at=NOW + 30 * DAY,
               metadata={"team": "a", "n": [1, 2]})
    bare = key(2)
    none_allowed = key(4, models=[])  # an empty list is not "every model"
    await store.create_key(full)
    await store.create_key(bare)
    await store.create_key(none_allowed)
    assert await store.get(none_allowed.id) == none_allowed

    got = await store.get_by_hash(full.key_hash)
    assert got == full
    assert await store.get(bare.id) == bare
    assert await store.get_by_hash("0" * 64) is None
    assert await store.get("key_missing") is None
    assert [k.id for k in await store.list_keys()] == [full.id, bare.id, none_allowed.id]

    with pytest.raises(KeyExists):
        await store.create_key(key(1))  # same id and hash

    changed = await store.update(bare.id, {"name": "renamed", "models": ["m1"], "rpm": 5,
                                           "budget_pico": 7, "expires_at": NOW + 1.5,
                                           "metadata": {"x": 1}})
    assert changed is not None
    assert (changed.name, changed.models, changed.rpm, changed.budget_pico,
            changed.expires_at, changed.metadata) == ("renamed", ["m1"], 5, 7, NOW + 1.5, {"x": 1})
    cleared = await store.update(bare.id, {"models": None, "expires_at": None})
    assert cleared is not None and cleared.models is None and cleared.expires_at is None
    assert await store.update("key_missing", {"name": "x"}) is None
    with pytest.raises(ValueError):
        await store.update(bare.id, {"key_hash": "evil"})

    assert await store.revoke(full.id, NOW + 5) is True
    assert await store.revoke(full.id, NOW + 9) is True  # again: the first time stays
    revoked = await store.get_by_hash(full.key_hash)
    assert revoked is not None and revoked.revoked_at == NOW + 5
    assert await store.revoke("key_missing", NOW) is False


async def test_only_the_hash_of_a_key_is_stored(stores):
    store = await stores.open()
    await store.create_key(key(3))
    dump = repr(stores.sql("SELECT * FROM api_keys"))
    assert "gw-secret-3" not in dump
    assert hashlib.sha256(b"gw-secret-3").hexdigest() in dump


# ---------------------------------------------------------------------------- audit


async def test_audit_records_are_written_with_every_field_intact(stores):
    store = await stores.open()
    records = [make_record(i) for i in range(3)] + [
        # streamed, served from the cache
        make_record(3, endpoint="/v1/messages", model="claude-3-5-haiku", provider="anthropic",
                    upstream_model="claude-3-5-haiku-20241022", ttft_ms=12.5, cache_hit=True,
                    reasoning_tokens=3, cached_tokens=7),
        # failed upstream: status, error code, no cost, no first token
        make_record(4, status=502, error_code="upstream_error", cost_pico=None, ttft_ms=None,
                    prompt_tokens=0, completion_tokens=0),
        # 401: no key, nothing known about the model
        make_record(5, key_id=None, user=None, model=None, provider=None, upstream_model=None,
                    status=401, error_code="invalid_api_key", cost_pico=None, ttft_ms=None,
                    latency_ms=0.25),
        # odd strings
        make_record(6, user="zoë ☃", request_id="req-ünïcode", client_ip="::1",
                    model="über-model"),
    ]
    for r in records:
        store.submit(r)
    assert store.statistics()["audit_submitted"] == len(records)
    await store.flush()
    stats = store.statistics()
    assert (stats["audit_written"], stats["audit_batches"], stats["db_ok"]) == (7, 1, True)
    got = sorted(await store.audit_rows(), key=lambda r: r.request_id)
    assert got == sorted(records, key=lambda r: r.request_id)


async def test_the_writer_task_flushes_by_time_and_by_size_and_at_shutdown(stores):
    store = await stores.open(flush_s=0.05, batch_size=100)
    async with running(store):
        for i in range(250):
            store.submit(make_record(i))
        # two full batches go at once; the last 50 within flush_s
        await wait_until(lambda: store.statistics()["audit_written"] == 250, "250 written")
        assert store.statistics()["audit_batches"] == 3
        for i in range(250, 260):
            store.submit(make_record(i))
        # cancelled right away: the shutdown flush writes the rest
    assert store.statistics()["audit_written"] == 260
    assert stores.sql("SELECT count(*) FROM audit_log") == [(260,)]


async def test_audit_batches_are_written_by_one_thread_at_the_lowest_priority(stores):
    """Fresh batches go through the store's WriterThread at nice 19, so a flush cannot
    hold a one-core worker's requests up (a long stream's record is fresh when its
    request ends); a batch that is behind (its first record submitted over
    WRITER_BEHIND_S ago: the niced thread could not keep up) and key lookups go
    through trio's thread cache at the normal priority.  Nice values are read back from
    /proc, per thread."""
    import os
    import threading
    import time
    from pathlib import Path

    from gwcore.stores.audit import WRITER_BEHIND_S

    store = await stores.open()
    writes = store._writes  # the writer's thread, started by the first fresh batch

    def nice_of_this_thread() -> tuple[str, int]:
        stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text()
        return threading.current_thread().name, int(stat.rsplit(")", 1)[1].split()[16])

    store.submit(make_record(0, ts=time.time() - WRITER_BEHIND_S - 60))
    await store.flush()
    assert store.statistics()["audit_written"] == 1
    assert (writes._thread, writes.jobs) == (None, 0)  # behind: the normal priority
    seen = []
    for i in (1, 2):  # the second one a stream that took 10 minutes, just ended
        took_s = 600.0 * (i - 1)
        store.submit(make_record(i, ts=time.time() - took_s, latency_ms=took_s * 1000))
        jobs = writes.jobs
        await store.flush()
        assert writes.jobs == jobs + 1  # the batch, in the writer's thread
        seen.append(await writes.run_sync(nice_of_this_thread))
    assert writes.niced is True
    assert seen == [(f"gwcore-audit-{stores.backend}", 19)] * 2
    assert store.statistics()["audit_written"] == 3
    _, lookup_nice = await trio.to_thread.run_sync(nice_of_this_thread)
    assert lookup_nice == os.getpriority(os.PRIO_PROCESS, 0)  # the process's own
    with pytest.raises(ZeroDivisionError):  # an error in the thread reaches the caller
        await writes.run_sync(lambda: 1 // 0)
    assert await writes.run_sync(lambda: 7) == 7  # and the thread goes on


async def test_rollups_answer_usage_by_key_model_and_day(stores):
    store = await stores.open()
    ka, kb = "key_aaaaaaaaaaaaaaaa", "key_bbbbbbbbbbbbbbbb"
    yesterday = NOW - DAY
    plan = [  # (ts, key, model, prompt, completion, cost)
        (yesterday, ka, "m1", 10, 1, 100), (yesterday, ka, "m1", 20, 2, 200),
        (yesterday, kb, "m2", 5, 5, None), (NOW, ka, "m1", 1, 1, 1),
        (NOW, ka, "m2", 2, 2, 2), (NOW, kb, "m2", 3, 3, 3), (NOW, None, None, 0, 0, None),
    ]
    for i, (ts, k, m, p, c, cost) in enumerate(plan):
        store.submit(make_record(i, ts=ts + i / 1000, key_id=k, model=m, prompt_tokens=p,
                                 completion_tokens=c, cost_pico=cost))
    await store.flush()
    d0, d1 = day(yesterday), day(NOW)

    def rows(us):
        return [(u.day, u.key_id, u.model, u.requests, u.prompt_tokens, u.completion_tokens,
                 u.cost_pico) for u in us]

    assert rows(await store.usage()) == [
        (d0, ka, "m1", 2, 30, 3, 300), (d0, kb, "m2", 1, 5, 5, 0),
        (d1, None, None, 1, 0, 0, 0), (d1, ka, "m1", 1, 1, 1, 1), (d1, ka, "m2", 1, 2, 2, 2),
        (d1, kb, "m2", 1, 3, 3, 3)]
    assert rows(await store.usage(key_id=kb)) == [(d0, kb, "m2", 1, 5, 5, 0),
                                                  (d1, kb, "m2", 1, 3, 3, 3)]
    assert rows(await store.usage(model="m1")) == [(d0, ka, "m1", 2, 30, 3, 300),
                                                   (d1, ka, "m1", 1, 1, 1, 1)]
    assert [r.day for r in await store.usage(since=d1)] == [d1] * 4
    assert [r.day for r in await store.usage(until=d0)] == [d0] * 2
    assert rows(await store.usage(key_id=ka, model="m2", since=d0, until=d1)) == [
        (d1, ka, "m2", 1, 2, 2, 2)]
    assert await store.usage(model="nope") == []

    # A second batch adds to the same rollup rows.
    store.submit(make_record(99, ts=NOW, key_id=ka, model="m1", prompt_tokens=4,
                             completion_tokens=4, cost_pico=4))
    await store.flush()
    assert rows(await store.usage(key_id=ka, model="m1", since=d1)) == [
        (d1, ka, "m1", 2, 5, 5, 5)]

    assert await store.spend_pico(ka) == 300 + 1 + 2 + 4
    assert await store.spend_pico(kb) == 3
    assert await store.spend_pico("key_none") == 0
    await store.create_key(key(7, id=ka))
    found = await store.get(ka)
    assert found is not None and found.spent_pico == 307


async def test_audit_rows_keep_no_repeated_strings(stores):
    store = await stores.open()
    for i in range(20):
        store.submit(make_record(i))
    await store.flush()
    if stores.backend == "sqlite":
        columns = {name: kind for _, name, kind, *_ in stores.sql("PRAGMA table_info(audit_log)")}
        text = {n for n, k in columns.items() if k == "TEXT"}
    else:
        columns = dict(stores.sql("SELECT column_name, data_type FROM information_schema.columns"
                                  " WHERE table_name = 'audit_log'"))
        text = {n for n, k in columns.items() if k == "text"}
        assert columns["ts"] == "timestamp with time zone"
        assert columns["cost_pico"] == columns["latency_us"] == "bigint"
    # Only per-request strings are text; the repeated ones are ids into names.
    assert text == {"request_id", "key_id", "user_name", "client_ip"}
    for name in ("endpoint_id", "model_id", "provider_id", "upstream_model_id", "error_code_id"):
        assert name in columns
    # Each distinct name is stored once, however many rows use it.
    assert stores.sql("SELECT count(*) FROM names") == [(4,)]  # endpoint, 2 models, provider


# ---------------------------------------------------------------------------- migrations


async def test_migrations_apply_once_even_when_run_again_or_at_once(stores):
    first = stores.make()
    assert await first.migrate() == [1]
    assert await first.migrate() == []
    assert stores.sql("SELECT version FROM schema_migrations") == [(1,)]

    # Two processes starting at once on a new database: each version applied once.
    stores.new_database()
    a, b = stores.make(spool_dir=stores.tmp_path / "sa"), stores.make(spool_dir=stores.tmp_path / "sb")
    results = {}

    async def migrate(name, store):
        results[name] = await store.migrate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(migrate, "a", a)
        nursery.start_soon(migrate, "b", b)
    assert sorted([results["a"], results["b"]]) == [[], [1]]
    assert stores.sql("SELECT version FROM schema_migrations") == [(1,)]
    await a.create_key(key(1))
    assert (await b.get(key(1).id)) == key(1)


# ---------------------------------------------------------------------------- spool


async def test_a_full_buffer_spools_at_once_and_a_new_store_replays_it(stores):
    first = await stores.open(max_buffer=100, batch_size=40)
    for i in range(250):
        first.submit(make_record(i))  # never waits, never raises
    stats = first.statistics()
    # Twice at 100 records: 200 spooled at once (files of 40, 40, 20 each time),
    # 50 still in memory.
    assert (stats["audit_spooled"], stats["spool_files"], stats["audit_buffered"]) == (200, 6, 50)
    assert stats["audit_written"] == 0
    files = sorted(p.name for p in stores.spool_dir.glob("*.batch"))
    assert files == [f"{i:016d}.batch" for i in range(1, 7)]
    # The process dies: what was only in memory is gone, the spool is not.
    first._writer.close()

    second = stores.make(batch_size=40)
    async with running(second):
        await wait_until(lambda: second.statistics()["spool_files"] == 0, "the spool replayed")
    stats = second.statistics()
    assert (stats["audit_replayed"], stats["audit_written"]) == (200, 200)
    ids = [r for (r,) in stores.sql("SELECT request_id FROM audit_log")]
    assert sorted(ids) == [f"req-{i:06d}" for i in range(200)]
    assert list(stores.spool_dir.glob("*.batch")) == []


async def test_a_batch_already_committed_is_not_written_twice(stores):
    store = await stores.open()
    batch = Batch(uuid.uuid4().hex, 1, [make_record(i) for i in range(30)])
    assert await store.write_batch(batch) is True
    assert await store.write_batch(batch) is False  # the same id again: skipped
    # A crash after the commit but before the spool file was deleted: the file stays.
    spool = Spool(stores.spool_dir)
    spool.write(batch)
    spool.close()
    await store.flush()  # replays the spool
    stats = store.statistics()
    assert (stats["audit_duplicates_skipped"], stats["spool_files"]) == (30, 0)
    assert stats["audit_replayed"] == 0
    assert stores.sql("SELECT count(*) FROM audit_log") == [(30,)]
    [usage] = await store.usage()
    assert usage.requests == 30
    assert await store.spend_pico(make_record(0).key_id) == sum(
        r.cost_pico for r in batch.records)


async def test_an_unreadable_spool_file_is_set_aside_not_lost(stores):
    store = await stores.open()
    stores.spool_dir.mkdir(parents=True)
    (stores.spool_dir / "0000000000000001.batch").write_bytes(b"{not json")
    spool = Spool(stores.spool_dir)
    spool.write(Batch(uuid.uuid4().hex, 2, [make_record(1)]))
    spool.close()
    await store.flush()
    stats = store.statistics()
    assert (stats["spool_files"], stats["spool_rejected"], stats["audit_replayed"]) == (0, 1, 1)
    assert (stores.spool_dir / "rejected" / "0000000000000001.batch").read_bytes() == b"{not json"


# ---------------------------------------------------------------------------- retention


async def test_retention_removes_audit_rows_of_old_days_and_keeps_rollups(stores):
    store = await stores.open(retention_days=30)
    for i, age in enumerate([0, 1, 29, 30, 31, 40, 40]):
        store.submit(make_record(i, ts=NOW - age * DAY))
    await store.flush()
    assert stores.sql("SELECT count(*) FROM audit_log") == [(7,)]
    if stores.backend == "postgres":
        def partitions():
            return sorted(n for (n,) in stores.sql(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'audit_log'::regclass"))
        before = partitions()
        # made on demand for each day, plus tomorrow ahead
        assert len(before) == 7 - 1 + 1
        assert await store.apply_retention(NOW) == 2  # days 31 and 40 ago
        after = partitions()
        assert sorted(set(before) - set(after)) == [
            f"audit_log_p{datetime.fromtimestamp(NOW - a * DAY, UTC):%Y%m%d}" for a in (40, 31)]
    else:
        assert await store.apply_retention(NOW) == 3
    assert stores.sql("SELECT count(*) FROM audit_log") == [(4,)]
    assert sum(u.requests for u in await store.usage()) == 7
    assert await store.apply_retention(NOW) == 0  # idempotent
    # Records of a dropped day can still arrive (a late spool): the partition comes back.
    store.submit(make_record(50, ts=NOW - 40 * DAY))
    await store.flush()
    assert stores.sql("SELECT count(*) FROM audit_log") == [(5,)]


async def test_statistics_start_empty_and_healthy(stores):
    store = await stores.open()
    stats = store.statistics()
    assert stats["db_ok"] is True and stats["last_error"] is None
    assert all(stats[k] == 0 for k in ("audit_submitted", "audit_written", "audit_spooled",
                                       "audit_replayed", "audit_batches", "spool_files"))
