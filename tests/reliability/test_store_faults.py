"""Redis and Postgres killed and restarted under concurrent load (real servers).

``tests/integration/test_store_outages.py`` covers one outage each with sequential
traffic and fail-open limits.  These add what it does not: concurrent clients, the
fail-closed policy, both stores down at once, Postgres dying in the middle of a batch
and again in the middle of replaying the spool, and an exactly-once check of the audit
log by request id (no loss, no duplicate, rollups not double counted).

Postgres is made to die *mid-batch* deterministically: the test holds an exclusive
lock on ``key_spend``, the last table a batch transaction writes, so the gateway's
batch blocks inside its transaction (its rows already COPYed); the test sees it waiting
in ``pg_stat_activity`` and then kills the server (``pg_ctl stop -m immediate``).
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import httpx
import psycopg
import pytest
import trio

from tests.reliability.conftest import chat
from tests.support.mock_openai import serve_mock_openai

KEY = "gw-store-faults-key-01"
MASTER = "gw-store-faults-master-01"
LIMITS = "limits:\n  default: {requests: 100000000, window_s: 1}\n  redis_fail: POLICY\n"


class Load:
    """Concurrent clients sending requests until stopped; every answer is kept."""

    def __init__(self, url: str, *, workers: int = 6, pause_s: float = 0.01,
                 key: str = KEY, prefix: str = "load") -> None:
        self.url = url
        self.prefix = prefix
        self.workers = workers
        self.pause_s = pause_s
        self.key = key
        self.ids = itertools.count()
        self.answers: list[tuple[str, int, str, str]] = []  # request id, status, code, phase
        self.started: set[str] = set()  # also the ones cut off by ``stop`` mid-way
        self.phase = "before"
        self._stop = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=20) as h, trio.open_nursery() as nursery:
            for w in range(self.workers):
                nursery.start_soon(self._worker, h, w)
            task_status.started()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _worker(self, h: httpx.AsyncClient, w: int) -> None:
        while True:
            i = next(self.ids)
            rid = f"{self.prefix}-{i:06d}"
            phase = self.phase
            self.started.add(rid)
            a = await chat(h, self.url, self.key, "gpt-4o-mini", stream=i % 3 == 0,
                           headers={"x-request-id": rid},
                           # Every fourth request repeats a prompt: cache hits.
                           body={"model": "gpt-4o-mini", "stream": i % 3 == 0,
                                 "messages": [{"role": "user",
                                               "content": f"hi {i if i % 4 else 0}"}]})
            code = a.error["code"] if a.status != 200 else ""
            if a.status == 200 and a.events:
                assert a.events[-1] == "[DONE]", a.events[-2:]
            self.answers.append((rid, a.status, code, phase))
            await trio.sleep(self.pause_s)

    def stop(self) -> None:
        self._stop.set()

    def statuses(self, phase: str | None = None) -> Counter[tuple[int, str]]:
        return Counter((s, c) for _, s, c, p in self.answers if phase in (None, p))

    def count(self) -> int:
        return len(self.answers)

    def check_once(self, counts: dict[str, int]) -> None:
        """Every answered request has exactly one audit record; the only others are
        requests ``stop`` cut off in flight (the gateway may have answered those)."""
        assert {rid: n for rid, n in counts.items() if n != 1} == {}
        answered = {rid for rid, *_ in self.answers}
        assert answered <= set(counts), sorted(answered - set(counts))[:10]
        assert set(counts) <= self.started


async def wait_for(check, what: str, timeout_s: float = 20.0) -> None:
    with trio.move_on_after(timeout_s):
        while not await check():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def grow(load: Load, n: int) -> None:
    """Let the load send ``n`` more requests."""
    target = load.count() + n
    await wait_for(_async(lambda: load.count() >= target), f"{n} more requests")


def _async(fn):
    async def check() -> bool:
        return fn()
    return check


# -- Postgres --------------------------------------------------------------------------


def crash_safe_database(pg) -> str:
    """A new database whose commits survive ``pg_ctl stop -m immediate``.

    The session's test server runs with ``synchronous_commit=off`` (fast), which lets a
    crash take back commits already acknowledged; a crash test on it would see records
    "lost" by Postgres, not by the gateway.  This database turns it back on."""
    dsn = pg.create_database()
    name = dsn.rsplit("dbname=", 1)[1]
    pg_sql(pg.dsn(), f'ALTER DATABASE "{name}" SET synchronous_commit = on')
    return dsn


def pg_sql(dsn: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


class TableLock:
    """Hold ``LOCK TABLE ... ACCESS EXCLUSIVE`` in an open transaction (a worker thread's
    connection) until the server dies or ``release``."""

    def __init__(self, dsn: str, table: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=False, connect_timeout=3)
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def close(self) -> None:
        try:
            self.conn.close()
        except psycopg.Error:
            pass


def gateway_waits_on_lock(dsn: str) -> bool:
    rows = pg_sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                       "'gwcore' AND wait_event_type = 'Lock'")
    return rows[0][0] > 0


async def test_postgres_dies_mid_batch_and_mid_replay_under_load_and_every_record_lands_once(
        gateway_factory, postgres_server):
    pg = postgres_server
    dsn = crash_safe_database(pg)
    async with serve_mock_openai(record=False) as mock:
        env = {"OPENAI_API_KEY": "sk-up-store-faults", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, "DATABASE_URL": dsn}
        text = LIMITS.replace("POLICY", "open") + "cache: {enabled: true}\n"
        async with gateway_factory(text, env=env) as gw, httpx.AsyncClient(timeout=10) as h:
            audit = gw.app.gateway.audit
            load = Load(gw.url)
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run)
                await grow(load, 60)
                await wait_for(_async(lambda: audit.statistics()["audit_written"] > 0),
                               "the first batch written")

                # 1. Killed mid-batch: a batch waits on the lock inside its transaction.
                lock = await trio.to_thread.run_sync(TableLock, dsn, "key_spend")
                try:
                    await wait_for(lambda: trio.to_thread.run_sync(gateway_waits_on_lock, dsn),
                                   "a batch blocked inside its transaction")
                    load.phase = "down"
                    await trio.to_thread.run_sync(pg.stop, "immediate")
                finally:
                    await trio.to_thread.run_sync(lock.close)
                try:
                    await grow(load, 80)  # traffic goes on; records go to the spool
                    await wait_for(_async(lambda: audit.statistics()["spool_files"] >= 2),
                                   "batches spooled")
                    ready = (await h.get(f"{gw.url}/readyz")).json()
                    assert ready["checks"]["database"] == "degraded"
                finally:
                    await trio.to_thread.run_sync(pg.start)

                # 2. Killed again while replaying the spool: the replayed batch blocks.
                lock = await trio.to_thread.run_sync(TableLock, dsn, "key_spend")
                try:
                    await wait_for(lambda: trio.to_thread.run_sync(gateway_waits_on_lock, dsn),
                                   "the replay blocked inside its transaction", 40)
                    assert audit.statistics()["spool_files"] >= 1  # mid-replay
                    load.phase = "down again"
                    await trio.to_thread.run_sync(pg.stop, "immediate")
                finally:
                    await trio.to_thread.run_sync(lock.close)
                try:
                    await grow(load, 40)
                finally:
                    await trio.to_thread.run_sync(pg.start)
                load.phase = "after"

                def replayed() -> bool:
                    s = audit.statistics()
                    return s["db_ok"] and s["spool_files"] == 0
                await wait_for(_async(replayed), "the spool replayed", 40)
                await grow(load, 40)
                load.stop()
            stats = audit.statistics()
    # The gateway has shut down: its last records were flushed to the database.
    assert stats["audit_spooled"] > 0 and stats["audit_replayed"] > 0
    assert set(load.statuses()) == {(200, "")}, load.statuses()
    rows = pg_sql(dsn, "SELECT request_id, count(*) FROM audit_log GROUP BY request_id")
    load.check_once(dict(rows))
    # The rollups were written in the same transactions: not double counted either.
    [(requests,)] = pg_sql(dsn, "SELECT sum(requests) FROM usage_daily")
    [(records,)] = pg_sql(dsn, "SELECT count(*) FROM audit_log")
    assert requests == records


# -- Redis -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_killed_under_load_follows_the_fail_policy_and_the_cache_never_fails(
        gateway_factory, redis_server, policy):
    redis_server.start()
    redis_server.flush()
    async with serve_mock_openai(record=False) as mock:
        env = {"OPENAI_API_KEY": "sk-up-store-faults", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, "GATEWAY_MASTER_KEY": MASTER,
               "REDIS_URL": redis_server.url}
        text = LIMITS.replace("POLICY", policy) + "cache: {enabled: true}\n"
        async with gateway_factory(text, env=env) as gw, httpx.AsyncClient(timeout=10) as h:
            load = Load(gw.url)
            # The master key is not rate limited: it shows the cache alone failing.
            master = Load(gw.url, workers=2, key=MASTER, prefix="master")
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run)
                await nursery.start(master.run)
                await grow(load, 60)
                assert gw.app.gateway.cache.statistics()["cache_hits_total"] > 0
                load.phase = master.phase = "going down"
                await trio.to_thread.run_sync(redis_server.stop)
                try:
                    async def noticed() -> bool:
                        return (await h.get(f"{gw.url}/readyz")).json()["checks"]["redis"] \
                            != "ok"
                    await wait_for(noticed, "the outage noticed", 10)
                    load.phase = master.phase = "down"
                    await grow(load, 100)
                    await grow(master, 30)
                    ready = await h.get(f"{gw.url}/readyz")
                    assert ready.json()["checks"]["redis"] == \
                        ("degraded" if policy == "open" else "down")
                    assert ready.status_code == (200 if policy == "open" else 503)
                finally:
                    load.phase = master.phase = "restarting"
                    await trio.to_thread.run_sync(redis_server.start)

                async def redis_ok() -> bool:
                    return (await h.get(f"{gw.url}/readyz")).json()["checks"]["redis"] == "ok"
                await wait_for(redis_ok, "Redis back in use")
                load.phase = master.phase = "after"
                await grow(load, 60)
                load.stop()
                master.stop()
            assert set(load.statuses("before")) == {(200, "")}
            assert set(load.statuses("after")) == {(200, "")}
            down = load.statuses("down")
            if policy == "open":
                assert set(down) == {(200, "")}, down
            else:
                # Fail closed: 503 for every limited request once the outage is known
                # (before that, a request may still pass on its worker's lease slice).
                assert set(down) == {(503, "upstream_unavailable")}, down
                assert set(load.statuses("going down")) <= \
                    {(503, "upstream_unavailable"), (200, "")}
            # The cache going away never fails a request (the master key is not limited).
            assert set(master.statuses()) == {(200, "")}, master.statuses()
            # And every one of those requests has its audit record, once.
            with trio.fail_after(10):
                while True:
                    rows = await gw.app.gateway.audit.audit_rows()
                    ids = Counter(r.request_id for r in rows)
                    if len(ids) >= load.count() + master.count():
                        break
                    await trio.sleep(0.1)
    load.check_once({rid: n for rid, n in ids.items() if rid in load.started})
    master.check_once({rid: n for rid, n in ids.items() if rid in master.started})
    assert set(ids) <= load.started | master.started


async def test_redis_and_postgres_down_together_traffic_goes_on_and_records_land_once(
        gateway_factory, redis_server, postgres_server):
    pg = postgres_server
    dsn = crash_safe_database(pg)
    redis_server.start()
    redis_server.flush()
    async with serve_mock_openai(record=False) as mock:
        env = {"OPENAI_API_KEY": "sk-up-store-faults", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, "DATABASE_URL": dsn, "REDIS_URL": redis_server.url}
        text = LIMITS.replace("POLICY", "open") + "cache: {enabled: true}\n"
        async with gateway_factory(text, env=env) as gw, httpx.AsyncClient(timeout=10) as h:
            audit = gw.app.gateway.audit
            load = Load(gw.url)
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run)
                await grow(load, 40)
                load.phase = "down"
                async with trio.open_nursery() as both:
                    both.start_soon(trio.to_thread.run_sync, redis_server.stop)
                    both.start_soon(trio.to_thread.run_sync, pg.stop, "immediate")
                try:
                    await grow(load, 100)

                    # The database is "degraded" once the audit writer's next flush
                    # (every 0.5 s) has failed: 100 requests can take less than that.
                    async def both_degraded() -> bool:
                        checks = (await h.get(f"{gw.url}/readyz")).json()["checks"]
                        return checks == {"server": "ok", "database": "degraded",
                                          "redis": "degraded"}
                    await wait_for(both_degraded, "/readyz to report both stores degraded", 10)
                finally:
                    async with trio.open_nursery() as both:
                        both.start_soon(trio.to_thread.run_sync, redis_server.start)
                        both.start_soon(trio.to_thread.run_sync, pg.start)
                load.phase = "after"

                async def recovered() -> bool:
                    s = audit.statistics()
                    checks = (await h.get(f"{gw.url}/readyz")).json()["checks"]
                    return s["db_ok"] and s["spool_files"] == 0 and checks["redis"] == "ok"
                await wait_for(recovered, "both stores back", 40)
                await grow(load, 40)
                load.stop()
    assert set(load.statuses()) == {(200, "")}, load.statuses()
    rows = pg_sql(dsn, "SELECT request_id, count(*) FROM audit_log GROUP BY request_id")
    load.check_once(dict(rows))


# Regression (fixed in gwcore/auth.py and gwcore/api/admin.py): with Postgres down, a
# dynamic key stopped working (500 "Internal error") as soon as its 5 s key-cache entry
# expired, any key not cached got a 500 as well, and so did the admin API.  Now a key
# this worker accepted before goes on working, every other key gets the same 503
# (no existence oracle), and the admin API answers 503.
async def test_dynamic_keys_keep_working_through_a_postgres_outage(
        gateway_factory, postgres_server, monkeypatch):
    import gwcore.auth

    monkeypatch.setattr(gwcore.auth, "KEY_CACHE_TTL_S", 0.2)  # outlive the cache quickly
    monkeypatch.setattr(gwcore.auth, "STORE_RETRY_S", 0.1)
    pg = postgres_server
    dsn = crash_safe_database(pg)
    master = {"authorization": f"Bearer {MASTER}"}
    async with serve_mock_openai(record=False) as mock:
        env = {"OPENAI_API_KEY": "sk-up-store-faults", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_MASTER_KEY": MASTER, "DATABASE_URL": dsn}
        async with gateway_factory(env=env) as gw, httpx.AsyncClient(timeout=10) as h:
            async def make(**kw) -> dict:
                r = await h.post(f"{gw.url}/admin/keys", headers=master, json={"name": "d", **kw})
                assert r.status_code == 201
                return r.json()

            dynamic = (await make(budget_usd=10))["key"]
            revoked = await make()
            assert (await h.delete(f"{gw.url}/admin/keys/{revoked['id']}",
                                   headers=master)).status_code == 200
            unknown = "gw-" + "u" * 43
            assert (await chat(h, gw.url, dynamic, "gpt-4o-mini")).status == 200
            assert (await chat(h, gw.url, revoked["key"], "gpt-4o-mini")).status == 401
            assert (await chat(h, gw.url, dynamic, "gpt-4o-mini")).status == 200
            await trio.to_thread.run_sync(pg.stop, "immediate")
            try:
                await trio.sleep(0.3)  # every cache entry has expired
                for _ in range(3):
                    a = await chat(h, gw.url, dynamic, "gpt-4o-mini", stream=_ % 2 == 1)
                    assert a.status == 200, a.raw
                    await trio.sleep(0.25)
                refusals = []
                for key in (unknown, revoked["key"]):
                    a = await chat(h, gw.url, key, "gpt-4o-mini")
                    assert a.status == 503 and a.error["code"] == "upstream_unavailable", a.raw
                    assert a.headers["retry-after"] == "1"
                    refusals.append((a.raw, sorted((k, v) for k, v in a.headers.items()
                                                   if k not in ("x-request-id", "date"))))
                assert refusals[0] == refusals[1]  # unknown and revoked: the same answer
                for method, path in (("POST", "/admin/keys"), ("GET", "/admin/keys"),
                                     ("GET", "/admin/usage")):
                    r = await h.request(method, f"{gw.url}{path}", headers=master,
                                        json={"name": "x"} if method == "POST" else None)
                    assert r.status_code == 503, (path, r.text)
                    assert r.json()["error"]["code"] == "upstream_unavailable"
                stats = gw.app.gateway.auth.statistics()
                assert stats["key_stale_hits_total"] >= 1 and stats["key_store_errors_total"] >= 1
            finally:
                await trio.to_thread.run_sync(pg.start)
            await trio.sleep(0.3)
            assert (await chat(h, gw.url, unknown, "gpt-4o-mini")).status == 401
            assert (await chat(h, gw.url, revoked["key"], "gpt-4o-mini")).status == 401
            assert (await chat(h, gw.url, dynamic, "gpt-4o-mini")).status == 200
