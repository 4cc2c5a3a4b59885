"""No key in anything the gateway writes: its stdout and stderr (access log, events), its
data directory (SQLite file and WAL, spool files, anything else), the database it
writes to, and ``/metrics``.

The issue asks to grep everything the gateway wrote *during the suite*.  Our
interpretation: a dedicated session, representative of the suite, run against a
gateway subprocess whose every output we own (a file each for stdout and stderr, its
own working directory as data directory, its own database): good keys of every kind
(static, config, dynamic made through the admin API, the master key), bad keys
(unknown, revoked, a near miss of a real one, a real one in the wrong header), every
client API (chat, streams, embeddings, responses, Anthropic's messages, models),
errors (unknown model, bad JSON, an unreachable upstream, an upstream refusing its key,
a rate limit), the admin API, a metrics scrape, and a database outage so that the
spool is written.  The secrets looked for are every gateway key it saw (valid or not)
and every upstream provider key; the dynamic keys' display prefix (``gw-`` + 4
characters, shown by design) is not a secret, so each key is looked for whole and also
by the part after that prefix.

It runs twice: on the embedded SQLite store, and on Postgres, which is killed for a
while (``pg_ctl stop -m immediate``) to make the gateway spool its audit records; the
spool files are copied while they exist, since they are deleted once replayed.
"""
from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import trio

from tests.reliability.conftest import MESSAGES
from tests.reliability.test_store_faults import crash_safe_database
from tests.support.faulty_upstream import closed_port
from tests.support.mock_anthropic import serve_mock_anthropic
from tests.support.mock_openai import serve_mock_openai
from tests.support.procs import start_gateway


def secret(tag: str) -> str:
    return f"{tag}-{secrets.token_urlsafe(24)}"


CONFIG = """
models:
  - name: team-model
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "MOCK", api_key: "${DEPLOY_KEY}"}]
  - name: unreachable
    retries: 0
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "CLOSED", api_key: "${DEPLOY_KEY}"}]
  - name: refused-upstream
    retries: 0
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "REFUSING", api_key: "${DEPLOY_KEY}"}]
keys:
  - {key: "${TEAM_KEY}", name: team, models: [team-model, gpt-4o-mini]}
  - {key: "${RPM_KEY}", name: one-per-minute, rpm: 1}
cache: {enabled: true}
"""


class Session:
    def __init__(self, url: str) -> None:
        self.url = url
        self.secrets: dict[str, str] = {}
        self.metrics: list[str] = []
        self.statuses: list[int] = []
        self.key_ids: list[str] = []

    async def call(self, h: httpx.AsyncClient, method: str, path: str, key: str | None = None,
                   *, header: str = "authorization", stream: bool = False, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers[header] = f"Bearer {key}" if header == "authorization" else key
        if stream:
            async with h.stream(method, self.url + path, headers=headers, **kw) as r:
                await r.aread()
        else:
            r = await h.request(method, self.url + path, headers=headers, **kw)
        self.statuses.append(r.status_code)
        for value in self.secrets.values():  # nothing echoes a key back either
            assert value not in r.text, (path, r.text[:200])
        return r

    async def run(self, h: httpx.AsyncClient, master: str, static: str, team: str,
                  rpm: str, on_outage=None) -> None:
        chat = {"model": "gpt-4o-mini", "messages": MESSAGES}
        # The admin API: keys made, shown once, listed, changed, revoked.
        made = []
        for i in range(3):
            r = await self.call(h, "POST", "/admin/keys", master,
                                json={"name": f"dyn-{i}", "budget_usd": 5})
            assert r.status_code == 201
            made.append(r.json())
            self.key_ids.append(r.json()["id"])
            self.secrets[f"dynamic key {i}"] = r.json()["key"]
        for m in made:  # the 201 above was the one place a key may appear
            assert m["key"] not in (await self.call(h, "GET", "/admin/keys", master)).text
        await self.call(h, "GET", f"/admin/keys/{made[0]['id']}", master)
        await self.call(h, "PATCH", f"/admin/keys/{made[0]['id']}", master, json={"rpm": 50})
        await self.call(h, "DELETE", f"/admin/keys/{made[2]['id']}", master)
        revoked = made[2]["key"]
        dynamic = made[0]["key"]
        # Good keys, every API.
        for key in (static, team, dynamic, master):
            assert (await self.call(h, "POST", "/v1/chat/completions", key, json=chat)).status_code == 200
            await self.call(h, "POST", "/v1/chat/completions", key, stream=True,
                            json={**chat, "stream": True,
                                  "stream_options": {"include_usage": True}})
        await self.call(h, "POST", "/v1/chat/completions", team, json={**chat, "model": "team-model"})
        await self.call(h, "POST", "/v1/embeddings", dynamic,
                        json={"model": "text-embedding-3-small", "input": "hello"})
        await self.call(h, "POST", "/v1/responses", static, json={"model": "gpt-4o-mini",
                                                                  "input": "hello"})
        msg = {"model": "claude-3-5-haiku-latest", "max_tokens": 20, "messages": MESSAGES}
        assert (await self.call(h, "POST", "/v1/messages", dynamic, header="x-api-key",
                                json=msg)).status_code == 200
        r = await self.call(h, "POST", "/v1/messages", static, stream=True,
                            json={**msg, "stream": True})
        assert r.status_code == 200
        await self.call(h, "GET", "/v1/models", dynamic)
        # Bad keys.
        near_miss = dynamic[:-1] + ("A" if dynamic[-1] != "A" else "B")
        unknown = "gw-" + secrets.token_urlsafe(32)
        self.secrets.update({"unknown key": unknown, "near miss": near_miss})
        for key in (unknown, revoked, near_miss, static + "x"):
            assert (await self.call(h, "POST", "/v1/chat/completions", key,
                                    json=chat)).status_code == 401
        await self.call(h, "POST", "/v1/messages", unknown, header="x-api-key", json=msg)
        await self.call(h, "POST", "/v1/chat/completions", None, json=chat,
                        headers={"x-api-key": static})  # the wrong header for this API
        await self.call(h, "POST", "/v1/chat/completions", None, json=chat,
                        headers={"authorization": f"Basic {static}"})
        await self.call(h, "GET", "/admin/keys", static)
        await self.call(h, "GET", "/admin/usage", master[:-1])
        # Errors.
        await self.call(h, "POST", "/v1/chat/completions", static,
                        json={**chat, "model": "no-such-model"})
        await self.call(h, "POST", "/v1/chat/completions", static, content=b"{not json",
                        headers={"content-type": "application/json"})
        await self.call(h, "POST", "/v1/chat/completions", team,
                        json={**chat, "model": "unreachable"})
        await self.call(h, "POST", "/v1/chat/completions", static,
                        json={**chat, "model": "unreachable"})
        await self.call(h, "POST", "/v1/chat/completions", static,
                        json={**chat, "model": "refused-upstream"})
        r = await self.call(h, "POST", "/v1/chat/completions", static, stream=True,
                            json={**chat, "model": "refused-upstream", "stream": True})
        for _ in range(2):
            await self.call(h, "POST", "/v1/chat/completions", rpm, json=chat)
        assert 429 in self.statuses and 503 in self.statuses and 404 in self.statuses
        self.metrics.append((await self.call(h, "GET", "/metrics")).text)
        if on_outage is not None:
            await on_outage(self, h, static, dynamic, chat)
        await self.call(h, "GET", "/admin/usage", master)
        self.metrics.append((await self.call(h, "GET", "/metrics")).text)


async def run_session(tmp_path: Path, extra_env: dict[str, str], on_outage=None,
                      database_text=None) -> tuple[dict[str, str], dict[str, bytes]]:
    data_dir = tmp_path / "gateway"      # the gateway's cwd: data/gateway.db, data/spool
    data_dir.mkdir()
    inputs = tmp_path / "inputs"         # what we give it (config): not its output
    inputs.mkdir()
    keys = {"master key": secret("gw-master"), "static key": secret("gw-static"),
            "second static key": secret("gw-static2"), "team key": secret("gw-team"),
            "rpm key": secret("gw-rpm"), "openai upstream key": secret("sk-openai"),
            "anthropic upstream key": secret("sk-ant"), "deployment key": secret("sk-deploy")}
    async with serve_mock_openai() as mock, serve_mock_openai(status=401) as refusing, \
            serve_mock_anthropic() as anthropic:
        cfg = inputs / "gateway.yaml"
        cfg.write_text(CONFIG.replace("MOCK", mock.base_url)
                       .replace("CLOSED", f"http://127.0.0.1:{closed_port()}/v1")
                       .replace("REFUSING", refusing.base_url))
        env = {"GATEWAY_MASTER_KEY": keys["master key"],
               "GATEWAY_API_KEYS": f"{keys['static key']},{keys['second static key']}",
               "TEAM_KEY": keys["team key"], "RPM_KEY": keys["rpm key"],
               "DEPLOY_KEY": keys["deployment key"],
               "OPENAI_API_KEY": keys["openai upstream key"], "OPENAI_BASE_URL": mock.base_url,
               "ANTHROPIC_API_KEY": keys["anthropic upstream key"],
               "ANTHROPIC_BASE_URL": anthropic.base_url, **extra_env}
        out, err = (inputs / "stdout").open("wb"), (inputs / "stderr").open("wb")
        proc, port = await trio.to_thread.run_sync(lambda: start_gateway(
            "--config", str(cfg), env=env, cwd=data_dir, stdout=out, stderr=err))
        session = Session(f"http://127.0.0.1:{port}")
        session.secrets.update(keys)
        try:
            async with httpx.AsyncClient(timeout=20) as h:
                await session.run(h, keys["master key"], keys["static key"], keys["team key"],
                                  keys["rpm key"], on_outage)
            # The upstreams did get their keys: the ones we look for are the real ones.
            assert mock.requests[0].headers["authorization"] in (
                f"Bearer {keys['openai upstream key']}", f"Bearer {keys['deployment key']}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    written = {"stdout": (inputs / "stdout").read_bytes(),
               "stderr": (inputs / "stderr").read_bytes()}
    for i, text in enumerate(session.metrics):
        written[f"/metrics #{i}"] = text.encode()
    for p in sorted(data_dir.rglob("*")):
        if p.is_file():
            written[str(p.relative_to(data_dir))] = p.read_bytes()
    for p in sorted((tmp_path / "spool-copies").rglob("*")) if (tmp_path / "spool-copies").exists() else []:
        if p.is_file():
            written[f"spool copy {p.name}"] = p.read_bytes()
    if database_text is not None:
        written["database"] = (await trio.to_thread.run_sync(database_text)).encode()
    # The session really happened and was logged, and we look where the gateway keeps
    # what it knows of the keys (names in the log, ids in the audit records), or the
    # grep would prove nothing.
    assert written["stderr"].count(b'"msg":"request"') >= 40
    assert b'"key":"dyn-0"' in written["stderr"]
    assert b"gateway_requests_total" in written["/metrics #1"]
    stored = b"".join(v for k, v in written.items() if k.startswith(("data/", "database",
                                                                      "spool copy")))
    assert session.key_ids[0].encode() in stored
    return session.secrets, written


def assert_no_secret(found_secrets: dict[str, str], written: dict[str, bytes]) -> None:
    leaks = []
    for name, value in found_secrets.items():
        needles = {value.encode()}
        if value.startswith("gw-") and len(value) > 20:
            needles.add(value[7:].encode())  # past the display prefix
        for where, data in written.items():
            if any(n in data for n in needles):
                leaks.append(f"{name} in {where}")
    assert leaks == []


async def test_no_key_in_anything_the_gateway_wrote_sqlite(tmp_path):
    found, written = await run_session(tmp_path, {})
    assert "data/gateway.db" in written
    assert_no_secret(found, written)


async def test_no_key_in_anything_the_gateway_wrote_postgres_with_an_outage(
        tmp_path, postgres_server):
    import psycopg

    pg = postgres_server
    dsn = crash_safe_database(pg)
    copies = tmp_path / "spool-copies"
    copies.mkdir()

    async def outage(session: Session, h, static, dynamic, chat) -> None:
        await trio.to_thread.run_sync(pg.stop, "immediate")
        try:
            for i in range(30):
                key = static if i % 2 else dynamic
                await session.call(h, "POST", "/v1/chat/completions", key,
                                   stream=i % 3 == 0, json={**chat, "stream": i % 3 == 0})
            await session.call(h, "POST", "/v1/chat/completions", "gw-unknown-during-outage",
                               json=chat)
            spool = tmp_path / "gateway" / "data" / "spool"
            with trio.fail_after(15):
                while not list(spool.rglob("*.batch")):
                    await trio.sleep(0.1)
            for p in spool.rglob("*.batch"):
                shutil.copy(p, copies / p.name)
        finally:
            await trio.to_thread.run_sync(pg.start)
        with trio.fail_after(40):
            while (await h.get(f"{session.url}/readyz")).json()["checks"]["database"] != "ok":
                await trio.sleep(0.2)

    def database_text() -> str:
        with psycopg.connect(dsn, autocommit=True) as conn:
            tables = [t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
            return "\n".join(str(row) for t in tables
                             for row in conn.execute(f'SELECT t::text FROM "{t}" t').fetchall())

    found, written = await run_session(tmp_path, {"DATABASE_URL": dsn}, outage, database_text)
    assert any(k.startswith("spool copy") for k in written)
    assert_no_secret(found, written)
