"""The gateway on real Postgres and Redis, with each killed and restarted under load:
traffic goes on, and every request's audit record arrives exactly once."""
from __future__ import annotations

import httpx
import psycopg
import trio

from tests.integration.test_openai_sdk import MESSAGES
from tests.support.mock_openai import serve_mock_openai
from tests.support.pg import postgres_server  # noqa: F401  (the fixture)
from tests.support.redis import redis_server  # noqa: F401  (the fixture)

KEY = "outage-key-000001"


async def send(h: httpx.AsyncClient, gw, i: int, stream: bool = False) -> tuple[int, str]:
    r = await h.post(f"{gw.base_url}/chat/completions",
                     headers={"authorization": f"Bearer {KEY}", "x-request-id": f"req-{i}"},
                     json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream})
    return r.status_code, r.headers["x-request-id"]


async def test_postgres_killed_mid_load_loses_no_audit_record(gateway_factory, postgres_server):
    pg = postgres_server
    dsn = pg.dsn(pg.create_database())
    async with serve_mock_openai() as mock:
        env = {"OPENAI_API_KEY": "sk-up-1", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, "DATABASE_URL": dsn}
        async with gateway_factory(env=env) as gw:
            sent: list[str] = []
            async with httpx.AsyncClient(timeout=10) as h:
                async def burst(start: int, n: int) -> None:
                    for i in range(start, start + n):
                        status, rid = await send(h, gw, i, stream=i % 3 == 0)
                        assert status == 200
                        sent.append(rid)

                await burst(0, 30)
                pg.stop("immediate")  # a crash, not a shutdown
                try:
                    await burst(30, 40)  # traffic goes on; records go to the spool
                    with trio.fail_after(10):
                        while gw.app.gateway.audit.statistics()["db_ok"]:
                            await trio.sleep(0.05)
                    ready = (await h.get(f"{gw.url}/readyz")).json()
                    assert ready["checks"]["database"] == "degraded"
                    await burst(70, 30)
                finally:
                    pg.start()
                with trio.fail_after(30):
                    while True:
                        stats = gw.app.gateway.audit.statistics()
                        if stats["db_ok"] and stats["spool_files"] == 0 and \
                                stats["audit_written"] >= len(sent):
                            break
                        await trio.sleep(0.1)
            assert stats["audit_spooled"] > 0
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT request_id FROM audit_log").fetchall()
    ids = [r[0] for r in rows]
    assert sorted(ids) == sorted(sent)  # every record exactly once
    assert len(set(ids)) == len(ids) == 100


async def test_redis_killed_under_load_traffic_keeps_flowing(gateway_factory, redis_server):
    redis_server.flush()
    async with serve_mock_openai() as mock:
        env = {"OPENAI_API_KEY": "sk-up-1", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, "REDIS_URL": redis_server.url}
        async with gateway_factory("cache: {enabled: true}\n", env=env) as gw:
            async with httpx.AsyncClient(timeout=10) as h:
                for i in range(10):
                    assert (await send(h, gw, i))[0] == 200
                redis_server.stop()
                try:
                    for i in range(10, 40):  # fail open: local buckets, no cache
                        assert (await send(h, gw, i))[0] == 200
                    ready = (await h.get(f"{gw.url}/readyz"))
                    assert ready.status_code == 200
                    assert ready.json()["checks"]["redis"] == "degraded"
                finally:
                    redis_server.start()
                with trio.fail_after(10):
                    while (await h.get(f"{gw.url}/readyz")).json()["checks"]["redis"] != "ok":
                        await trio.sleep(0.1)
                assert (await send(h, gw, 99))[0] == 200
