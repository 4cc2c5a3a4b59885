"""Postgres goes away and comes back: the audit records wait in the spool, none is lost,
none is written twice, and they arrive in the order they were submitted."""
from __future__ import annotations

import orjson
import trio

from tests.stores.helpers import make_record, running, wait_until


def log_messages(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line)["msg"])
            except (orjson.JSONDecodeError, KeyError):
                pass
    return out


async def test_records_spool_while_postgres_is_down_and_replay_once_in_order(pg_stores, capfd):
    server = pg_stores.server
    store = await pg_stores.open(batch_size=50)
    submitted: list[str] = []

    async def feed(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            r = make_record(i)
            store.submit(r)
            submitted.append(r.request_id)
            if i % 10 == 0:
                await trio.sleep(0.005)

    def stats():
        return store.statistics()

    async with running(store):
        await feed(0, 100)
        await wait_until(lambda: stats()["audit_written"] == 100, "the first 100 written")

        await trio.to_thread.run_sync(server.stop)
        await feed(100, 400)  # the gateway keeps serving, and submitting
        await wait_until(lambda: not stats()["db_ok"] and stats()["spool_files"] >= 3,
                         "records spooled")
        assert len(list(pg_stores.spool_dir.glob("*.batch"))) == stats()["spool_files"]
        assert stats()["last_error"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, 400, 500)  # still submitting while it comes back
            await trio.to_thread.run_sync(server.start)
        await wait_until(lambda: stats()["audit_written"] == 500 and stats()["spool_files"] == 0,
                         "everything written once the database is back")
    s = stats()
    assert s["db_ok"] is True
    assert s["audit_replayed"] >= 250
    assert s["audit_spooled"] == s["audit_replayed"] + s["audit_duplicates_skipped"]
    assert list(pg_stores.spool_dir.glob("*.batch")) == []

    # Every record exactly once, in the order submitted (an append-only partition keeps
    # insertion order in ctid).
    ids = [r for (r,) in pg_stores.sql("SELECT request_id FROM audit_log ORDER BY ctid")]
    assert len(ids) == len(set(ids)) == 500
    assert ids == submitted
    [usage] = await store.usage()
    assert usage.requests == 500
    assert await store.spend_pico(make_record(0).key_id) == sum(
        make_record(i).cost_pico for i in range(500))  # type: ignore[misc]

    messages = log_messages(capfd.readouterr().err)
    assert messages.count("audit database unreachable; spooling audit records") == 1
    assert messages.count("audit database answers again; replaying the spool") == 1


async def test_a_new_process_replays_what_an_earlier_one_spooled_at_shutdown(pg_stores):
    server = pg_stores.server
    first = await pg_stores.open()
    async with running(first):
        await trio.to_thread.run_sync(server.stop)
        for i in range(120):
            first.submit(make_record(i))
        # cancelled here: the shutdown flush finds no database and spools
    s = first.statistics()
    assert (s["audit_written"], s["audit_spooled"]) == (0, 120)
    await first.close()  # the process exits
    await trio.to_thread.run_sync(server.start)

    second = pg_stores.make()
    async with running(second):
        await wait_until(lambda: second.statistics()["spool_files"] == 0, "the spool replayed")
    assert second.statistics()["audit_replayed"] == 120
    ids = [r for (r,) in pg_stores.sql("SELECT request_id FROM audit_log")]
    assert sorted(ids) == [f"req-{i:06d}" for i in range(120)]
