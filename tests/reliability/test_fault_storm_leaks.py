"""After storms of upstream faults, nothing leaks: the gateway's open file descriptors
and its sockets to the upstreams return to their baseline, and its memory does not grow
from one identical storm to the next.

The gateway runs as a subprocess (``gwcore serve``), so ``/proc/PID`` shows only its own
fds, sockets and RSS; the upstreams (one faulty upstream per fault mode, a healthy mock,
a slow healthy mock for streams the client abandons) run in the test's trio loop.

A storm is the same few hundred requests every time: every fault mode, streaming and
not, on a route with only the faulty deployment and on one that fails over, plus
clients that hang up mid-stream.  The first storm is the warm-up (pools fill, lazy
imports happen, caches of compiled regexes and the like settle); the baseline is taken
after it, and the next storms must come back to it.
"""
from __future__ import annotations

import itertools
import re
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.reliability.conftest import MESSAGES, chat, open_fds, rss_bytes, tcp_sockets_to
from tests.support.faulty_upstream import closed_port, serve_faulty_upstream
from tests.support.mock_openai import serve_mock_openai
from tests.support.procs import start_gateway

KEY = "gw-leak-check-key-01"
FAULTS = {
    "reset": {"events": 1}, "reset0": {"events": 0}, "stall": {"events": 1},
    "garbage": {"events": 1}, "truncated": {"events": 1}, "slow": {"first_byte_delay_s": 2.0},
    "s429": {"status": 429, "retry_after": "0.01"}, "s503": {"status": 503},
}
STORM_REQUESTS = 240
CONCURRENCY = 24
# Slack for the comparisons: a few fds may be in flux (a keep-alive connection the pool
# is just replacing), and RSS moves by allocator pages.
FD_SLACK = 4
RSS_GROWTH_LIMIT = 3 * 1024 * 1024


def config(faulty: dict[str, str], healthy: str, slow: str, transport: str) -> str:
    common = ("    retries: 1\n    timeout_s: 0.5\n    first_byte_timeout_s: 0.2\n"
              "    connect_timeout_s: 0.2\n    cooldown_s: 0.05\n")
    lines = ["models:"]
    for name, url in faulty.items():
        dep = (f"{{provider: openai, model: {name}, base_url: '{url}', api_key: sk-up-{name}, "
               f"transport: {transport}")
        lines += [f"  - name: solo-{name}", common.rstrip("\n"),
                  f"    deployments: [{dep}}}]"]
        lines += [f"  - name: pair-{name}", common.rstrip("\n"),
                  f"    deployments: [{dep}, weight: 1000}}, {{provider: openai, model: ok, "
                  f"base_url: '{healthy}', api_key: sk-up-ok, weight: 0.001, "
                  f"transport: {transport}}}]"]
    lines += ["  - name: slow-stream",
              f"    deployments: [{{provider: openai, model: slow, base_url: '{slow}', "
              f"api_key: sk-up-slow, transport: {transport}}}]"]
    lines += ["limits:", "  default: {requests: 100000000, window_s: 1}"]
    return "\n".join(lines) + "\n"


async def storm(url: str, routes: list[str]) -> dict[int, int]:
    """The same mix every time; returns the count of each status seen."""
    statuses: dict[int, int] = {}
    jobs = itertools.islice(itertools.cycle(
        [(r, s) for r in routes for s in (False, True)] + [("slow-stream", "abandon")] * 4),
        STORM_REQUESTS)
    limiter = trio.CapacityLimiter(CONCURRENCY)
    async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=CONCURRENCY)) as h:
        async def one(route: str, mode: object) -> None:
            async with limiter:
                if mode == "abandon":  # read the head and one chunk, then hang up
                    async with h.stream("POST", f"{url}/v1/chat/completions",
                                        headers={"authorization": f"Bearer {KEY}"},
                                        json={"model": route, "messages": MESSAGES,
                                              "stream": True}) as r:
                        async for _ in r.aiter_raw():
                            break
                    status = -r.status_code
                else:
                    status = (await chat(h, url, KEY, route, stream=bool(mode))).status
                statuses[status] = statuses.get(status, 0) + 1

        async with trio.open_nursery() as nursery:
            for route, mode in jobs:
                nursery.start_soon(one, route, mode)
    return statuses


def within(fds0: int, sockets0: int, fds: int, sockets: int) -> bool:
    """Back to the baseline: every fd that is not a socket to an upstream within the
    slack of where it was; the upstream sockets (the pools' idle keep-alive
    connections: how many stay open depends on how many requests overlapped, which
    varies from storm to storm) within the slack of the baseline or of the storm's
    concurrency.  A leak per failed request would be hundreds."""
    return (fds - sockets <= fds0 - sockets0 + FD_SLACK
            and sockets <= max(sockets0, CONCURRENCY) + FD_SLACK)


async def settle(pid: int, upstream_ports: set[int], fds: int, sockets: int) -> tuple[int, int]:
    """Poll for up to 5 s until fds and upstream sockets are back (``within``)."""
    now = (open_fds(pid), tcp_sockets_to(upstream_ports, pid))
    with trio.move_on_after(5):
        while not within(fds, sockets, *now):
            await trio.sleep(0.1)
            now = (open_fds(pid), tcp_sockets_to(upstream_ports, pid))
    return now


async def test_fds_sockets_and_memory_return_to_baseline_after_fault_storms(
        tmp_path: Path, transport: str) -> None:
    async with trio.open_nursery() as servers:
        faulty = {}
        ports: set[int] = set()
        for name, knobs in FAULTS.items():
            mode = "status" if name.startswith("s") and name[1:].isdigit() else name.rstrip("0")
            up = await servers.start(_serve, mode, knobs)
            faulty[name] = up.base_url
            ports.add(up.port)
        refused = closed_port()
        faulty["refused"] = f"http://127.0.0.1:{refused}/v1"
        healthy = await servers.start(_serve_mock, {})
        slow = await servers.start(_serve_mock, {"tokens_per_s": 20})
        ports |= {healthy.port, slow.port, refused}

        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(config(faulty, healthy.base_url, slow.base_url, transport))
        log = (tmp_path / "gateway.log").open("wb")
        proc, port = await trio.to_thread.run_sync(lambda: start_gateway(
            "--config", str(cfg), env={"GATEWAY_API_KEYS": KEY}, cwd=tmp_path,
            stdout=log, stderr=log))
        try:
            url = f"http://127.0.0.1:{port}"
            routes = [f"{kind}-{name}" for name in faulty for kind in ("solo", "pair")]
            warm = await storm(url, routes)
            assert {200, 502, 503, 504, 429} <= set(warm), warm
            await trio.sleep(0.5)
            fds0, sockets0 = open_fds(proc.pid), tcp_sockets_to(ports, proc.pid)
            rss = []
            for _ in range(2):
                seen = await storm(url, routes)
                # The same kinds of answers (how many of each varies with the breakers:
                # a deployment that is open is skipped, one that is not is tried).
                assert set(seen) == set(warm) and sum(seen.values()) == STORM_REQUESTS
                fds, sockets = await settle(proc.pid, ports, fds0, sockets0)
                assert within(fds0, sockets0, fds, sockets), (fds0, sockets0, fds, sockets)
                rss.append(rss_bytes(proc.pid))
            print(f"fds {fds0} -> {fds}, upstream sockets {sockets0} -> {sockets}, "
                  f"RSS MB {[round(r / 2**20, 1) for r in rss]}")
            assert rss[1] - rss[0] < RSS_GROWTH_LIMIT, [r / 2**20 for r in rss]
            assert proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            servers.cancel_scope.cancel()


async def _serve(mode: str, knobs: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with serve_faulty_upstream(mode, **knobs) as up:
        task_status.started(up)
        await trio.sleep_forever()


async def _serve_mock(knobs: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with serve_mock_openai(record=False, **knobs) as mock:
        task_status.started(mock)
        await trio.sleep_forever()


# -- what clients and upstreams name must not grow the gateway without bound ------------

_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\\n])*",?)*\})?'
                     r' -?[0-9.e+-]+$')


# Regression (fixed in gwcore/metrics.py): the ``error`` label of gateway_requests_total
# is an upstream's own error code for its 4xx answers, and it was neither escaped nor
# bounded: an upstream code with a quote and a newline broke the exposition format (and
# could inject series), and every distinct code, like every distinct model name a client
# sends to a prefix-routed family ("gpt-<anything>"), added a series forever.
async def test_upstream_error_codes_and_client_model_names_cannot_break_or_flood_metrics(
        gateway_factory, monkeypatch):
    import gwcore.metrics

    monkeypatch.setattr(gwcore.metrics, "MAX_ERROR_LABELS", 10)
    monkeypatch.setattr(gwcore.metrics, "MAX_MODEL_LABELS", 10)
    async with serve_mock_openai(status=400) as mock:
        env = {"OPENAI_API_KEY": "sk-up-metrics", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY}
        async with gateway_factory(env=env) as gw, httpx.AsyncClient(timeout=10) as h:
            codes = ['evil"} 1\ngateway_injected_total 999\n#', "a\\b"] + \
                [f"code_{i}" for i in range(40)]
            scrapes = []
            for i, code in enumerate(codes):
                mock.error_body = orjson.dumps({"error": {"message": "no", "type": "x",
                                                          "param": None, "code": code}})
                a = await chat(h, gw.url, KEY, f"gpt-made-up-{i}")
                assert a.status == 400
                if i in (21, len(codes) - 1):
                    scrapes.append((await h.get(f"{gw.url}/metrics")).text)
    for text in scrapes:
        assert not any(ln.startswith("gateway_injected_total") for ln in text.splitlines())
        bad = [ln for ln in text.splitlines() if ln and not ln.startswith("#")
               and not _SAMPLE.match(ln)]
        assert bad == []
    series = [[ln for ln in text.splitlines() if ln.startswith("gateway_requests_total{")]
              for text in scrapes]
    # Twenty more made-up models and codes, not one more series.
    assert len(series[1]) == len(series[0]), series[1]
    assert any('model="other"' in ln and 'error="other"' in ln for ln in series[1])
    assert any('error="invalid"' in ln for ln in series[1])


# Regression (fixed in gwcore/stores/audit.py, sqlite.py, postgres.py): each SQL store
# kept every name of its ``names`` table in memory (and loaded them all at start), and
# copied that whole map for every batch that brought a new name.  The names include
# the model a client asked for (404s too) and upstream error codes: a client inventing
# model names grew the gateway's memory without end.  Now an LRU of bounded size; a
# name that fell out is looked up again and keeps its one row.
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_made_up_names_do_not_grow_the_stores_name_cache(tmp_path, backend, request):
    from gwcore.ports import AuditRecord

    if backend == "sqlite":
        from gwcore.stores.sqlite import SQLiteStore
        store = SQLiteStore(tmp_path / "gw.db", spool_dir=tmp_path / "spool")
    else:
        from gwcore.stores.postgres import PostgresStore
        dsn = request.getfixturevalue("postgres_server").create_database()
        store = PostgresStore(dsn, spool_dir=tmp_path / "spool")
    store._names.max_entries = 50

    def record(i: int, model: str) -> AuditRecord:
        return AuditRecord(ts=time.time(), request_id=f"r{i}", key_id="k", user=None,
                           client_ip="127.0.0.1", endpoint="/v1/chat/completions",
                           model=model, provider=None, upstream_model=None, status=404,
                           prompt_tokens=0, completion_tokens=0, cached_tokens=0,
                           reasoning_tokens=0, cost_pico=None, latency_ms=1.0, ttft_ms=None,
                           cache_hit=False, error_code=f"err_{i % 97}")

    async with store:
        for i in range(400):
            store.submit(record(i, f"made-up-{i}"))
            if i % 100 == 99:
                await store.flush()
        assert len(store._names.ids) <= 50
        # Early names fell out of the cache; used again, they keep their one row.
        for i in range(400, 420):
            store.submit(record(i, f"made-up-{i - 400}"))
        await store.flush()
        rows = await store.audit_rows()
    assert [r.model for r in rows] == [f"made-up-{i}" for i in range(400)] + \
        [f"made-up-{i}" for i in range(20)]
    assert [r.error_code for r in rows] == [f"err_{i % 97}" for i in range(420)]
    if backend == "sqlite":
        import sqlite3
        with sqlite3.connect(tmp_path / "gw.db") as conn:
            n = conn.execute("SELECT count(*) FROM names WHERE name LIKE 'made-up-%'").fetchone()
    else:
        import psycopg
        with psycopg.connect(dsn) as conn:
            n = conn.execute("SELECT count(*) FROM names WHERE name LIKE 'made-up-%%'").fetchone()
    assert n == (400,)
