"""Access control: the admin API is the master key's alone, a key gets only its models and
its budget, sees nobody else's usage, cannot learn whether another key exists, and keys
are stored hashed.

Admin routes are enumerated, not listed by hand (``admin_routes``): the resources and
methods ``gwcore/api/admin.py`` dispatches on (read from its syntax tree), the admin
routes the README documents, and any ``/admin/...`` entry of the route table in
``gwcore/api/routes.py``; so an admin route added later is covered without editing this
file.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import re
import statistics
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.reliability.conftest import MESSAGES
from tests.support.faulty_upstream import closed_port
from tests.support.mock_openai import serve_mock_openai
from tests.support.procs import ROOT

MASTER = "gw-master-access-control-01"
NORMAL = "gw-normal-access-control-01"
RESTRICTED = "gw-restricted-access-ctl-01"
UPSTREAM = "sk-upstream-access-control-01"

CONFIG = """
models:
  - name: alpha
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "MOCK", api_key: UPKEY}]
  - name: beta
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "MOCK", api_key: UPKEY}]
  - name: gamma            # not allowed to the restricted keys; falls back to alpha, which is
    retries: 0
    fallbacks: [alpha]
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: "CLOSED", api_key: UPKEY}]
  - name: embed
    deployments: [{provider: openai, model: text-embedding-3-small, base_url: "MOCK", api_key: UPKEY}]
keys:
  - {key: RESTRICTED, name: restricted-static, models: [alpha]}
"""


@asynccontextmanager
async def access_stack(gateway_factory, env: dict[str, str] | None = None):
    async with serve_mock_openai() as mock:
        text = (CONFIG.replace("MOCK", mock.base_url).replace("UPKEY", UPSTREAM)
                .replace("CLOSED", f"http://127.0.0.1:{closed_port()}/v1")
                .replace("RESTRICTED", RESTRICTED))
        base_env = {"GATEWAY_MASTER_KEY": MASTER, "GATEWAY_API_KEYS": NORMAL,
                    "OPENAI_API_KEY": UPSTREAM, "OPENAI_BASE_URL": mock.base_url}
        async with gateway_factory(text, env={**base_env, **(env or {})}) as gw, \
                httpx.AsyncClient(base_url=gw.url, timeout=10) as h:
            yield gw, h, mock


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def create_key(h: httpx.AsyncClient, **params) -> dict:
    r = await h.post("/admin/keys", headers=bearer(MASTER), json={"name": "k", **params})
    assert r.status_code == 201, r.text
    return r.json()


async def revoke(h: httpx.AsyncClient, key_id: str) -> None:
    r = await h.delete(f"/admin/keys/{key_id}", headers=bearer(MASTER))
    assert r.status_code == 200, r.text


def openai_error(r: httpx.Response, status: int, code: str, type_: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["type"]) == (code, type_), body


# -- the admin routes, enumerated ---------------------------------------------------------

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def admin_routes() -> list[tuple[str, str]]:
    """(method, path) for every admin route we can find, with ids filled in."""
    from gwcore.api import admin

    tree = ast.parse(inspect.getsource(admin))
    resources: set[str] = set()
    methods: set[str] = set(HTTP_METHODS)
    for node in ast.walk(tree):
        # parts[2:3] == ["usage"] / != ["keys"]: the resource names dispatched on.
        if isinstance(node, ast.List) and len(node.elts) == 1 and \
                isinstance(node.elts[0], ast.Constant) and isinstance(node.elts[0].value, str):
            resources.add(node.elts[0].value)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.isupper() and node.value.isalpha() and len(node.value) <= 7:
            methods.add(node.value)  # method == "POST" ...
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"/admin/([a-z_]+)", readme))
    table = {path.split("/")[2] for path in _route_table_paths()
             if path.startswith("/admin/") and len(path.split("/")) > 2}
    resources |= documented | table - {""}
    assert {"keys", "usage"} <= resources, resources  # the enumeration still works
    routes = []
    for res in sorted(resources):
        for method in sorted(methods):
            routes.append((method, f"/admin/{res}"))
            routes.append((method, f"/admin/{res}/key_0123456789abcdef"))
    return routes + [("GET", "/admin/unknown"), ("GET", "/admin/"), ("POST", "/admin/keys/x/y")]


def _route_table_paths() -> set[str]:
    """String constants of the route table in routes.py that look like paths."""
    from gwcore.api import routes as routes_module
    tree = ast.parse(inspect.getsource(routes_module))
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.startswith("/")}


ADMIN_ROUTES = admin_routes()


async def test_every_admin_route_refuses_every_key_but_the_master_key(gateway_factory):
    async with access_stack(gateway_factory) as (gw, h, mock):
        restricted = await create_key(h, name="restricted-dynamic", models=["alpha"])
        revoked = await create_key(h, name="revoked")
        await revoke(h, revoked["id"])
        before = (await h.get("/admin/keys", headers=bearer(MASTER))).json()["data"]
        wrong_master = MASTER[:-1] + ("x" if MASTER[-1] != "x" else "y")
        refusals = {
            "no key": ({}, 401, "invalid_api_key", "invalid_request_error"),
            "normal key": (bearer(NORMAL), 403, "admin_only", "permission_error"),
            "restricted static key": (bearer(RESTRICTED), 403, "admin_only", "permission_error"),
            "dynamic key": (bearer(restricted["key"]), 403, "admin_only", "permission_error"),
            "revoked key": (bearer(revoked["key"]), 401, "invalid_api_key",
                            "invalid_request_error"),
            "wrong master key": (bearer(wrong_master), 401, "invalid_api_key",
                                 "invalid_request_error"),
            "master key as x-api-key": ({"x-api-key": MASTER}, 401, "invalid_api_key",
                                        "invalid_request_error"),
            "basic auth": ({"authorization": f"Basic {MASTER}"}, 401, "invalid_api_key",
                           "invalid_request_error"),
        }
        for method, path in ADMIN_ROUTES:
            for who, (headers, status, code, type_) in refusals.items():
                r = await h.request(method, path.replace("key_0123456789abcdef",
                                                         restricted["id"]),
                                    headers=headers, json={"name": "x", "models": None})
                try:
                    openai_error(r, status, code, type_)
                except AssertionError as exc:
                    raise AssertionError(f"{method} {path} with {who}: {exc}") from None
                assert restricted["id"] not in r.text and "restricted-dynamic" not in r.text
        # Nothing was created, changed or revoked by any of those calls.
        after = (await h.get("/admin/keys", headers=bearer(MASTER))).json()["data"]
        assert after == before
        r = await h.post("/v1/chat/completions", headers=bearer(restricted["key"]),
                         json={"model": "alpha", "messages": MESSAGES})
        assert r.status_code == 200
        # The master key does reach every documented route (the enumeration is real).
        for method, path, ok in (("GET", "/admin/keys", 200), ("POST", "/admin/keys", 201),
                                 ("GET", f"/admin/keys/{restricted['id']}", 200),
                                 ("PATCH", f"/admin/keys/{restricted['id']}", 200),
                                 ("GET", "/admin/usage", 200),
                                 ("DELETE", f"/admin/keys/{restricted['id']}", 200)):
            r = await h.request(method, path, headers=bearer(MASTER),
                                json={"name": "made-by-master"} if method != "GET" else None)
            assert r.status_code == ok, (method, path, r.text)


# Regression: routes.py picked the error format by path suffix, so any path ending in
# '/messages' (e.g. /admin/keys/messages) got its error in Anthropic's format.
async def test_an_admin_refusal_is_in_openai_format_whatever_the_id(gateway_factory):
    async with access_stack(gateway_factory) as (gw, h, mock):
        r = await h.get("/admin/keys/messages", headers=bearer(NORMAL))
        openai_error(r, 403, "admin_only", "permission_error")


# -- models -------------------------------------------------------------------------------


async def test_a_restricted_key_cannot_reach_other_models_by_any_path(gateway_factory):
    async with access_stack(gateway_factory) as (gw, h, mock):
        dynamic = await create_key(h, name="restricted-dynamic", models=["alpha"])
        for key in (RESTRICTED, dynamic["key"]):
            ok = await h.post("/v1/chat/completions", headers=bearer(key),
                              json={"model": "alpha", "messages": MESSAGES})
            assert ok.status_code == 200
            calls = sum(mock.counts.values())
            chat = {"messages": MESSAGES}
            attempts = [
                ("/v1/chat/completions", {"model": "beta", **chat}),
                # A route that falls back to an allowed one is still another model.
                ("/v1/chat/completions", {"model": "gamma", **chat}),
                # The upstream model of an allowed route, routed by its prefix.
                ("/v1/chat/completions", {"model": "gpt-4o-mini", **chat}),
                ("/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True, **chat}),
                ("/v1/chat/completions", {"model": "ALPHA", **chat}),
                ("/v1/chat/completions", {"model": "alpha ", **chat}),
                ("/chat/completions", {"model": "beta", **chat}),  # the path alias
                ("/v1/embeddings", {"model": "embed", "input": "hi"}),
                ("/v1/responses", {"model": "beta", "input": "hi"}),
            ]
            for path, body in attempts:
                r = await h.post(path, headers=bearer(key), json=body)
                openai_error(r, 403, "model_not_allowed", "permission_error")
            # Anthropic's ingress: the same refusal, in Anthropic's format.
            for headers in (bearer(key), {"x-api-key": key}):
                r = await h.post("/v1/messages", headers={**headers,
                                                          "anthropic-version": "2023-06-01"},
                                 json={"model": "beta", "max_tokens": 10, "messages": MESSAGES})
                assert r.status_code == 403, r.text
                assert r.json() == {"type": "error", "error": {
                    "type": "permission_error", "message": r.json()["error"]["message"]}}
            r = await h.post("/v1/messages", headers={"x-api-key": key},
                             json={"model": "alpha", "max_tokens": 10, "messages": MESSAGES})
            assert r.status_code == 200, r.text
            assert sum(mock.counts.values()) == calls + 1  # only the allowed call went up
            listed = (await h.get("/v1/models", headers=bearer(key))).json()["data"]
            assert [m["id"] for m in listed] == ["alpha"]


async def test_a_key_past_its_budget_is_refused_everywhere_before_the_upstream(gateway_factory):
    async with access_stack(gateway_factory) as (gw, h, mock):
        made = await create_key(h, name="tight", budget_usd=0.001)
        key = made["key"]
        r = await h.post("/v1/chat/completions", headers=bearer(key),
                         json={"model": "alpha", "messages": MESSAGES, "max_tokens": 5})
        assert r.status_code == 200
        # The operator lowers the budget below what the key has spent: it is past it.
        r = await h.patch(f"/admin/keys/{made['id']}", headers=bearer(MASTER),
                          json={"budget_usd": 1e-9})
        assert r.status_code == 200
        calls = sum(mock.counts.values())
        for path, body in (("/v1/chat/completions", {"model": "alpha", "messages": MESSAGES,
                                                     "max_tokens": 5}),
                           ("/v1/chat/completions", {"model": "alpha", "messages": MESSAGES,
                                                     "max_tokens": 5, "stream": True}),
                           ("/v1/embeddings", {"model": "embed", "input": "hi"})):
            r = await h.post(path, headers=bearer(key), json=body)
            openai_error(r, 429, "insufficient_quota", "insufficient_quota")
        r = await h.post("/v1/messages", headers={"x-api-key": key},
                         json={"model": "alpha", "max_tokens": 5, "messages": MESSAGES})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert sum(mock.counts.values()) == calls


# -- usage and existence -------------------------------------------------------------------


async def test_a_key_cannot_read_another_keys_usage_or_record(gateway_factory):
    async with access_stack(gateway_factory) as (gw, h, mock):
        a = await create_key(h, name="team-a")
        b = await create_key(h, name="team-b")
        r = await h.post("/v1/chat/completions", headers=bearer(b["key"]),
                         json={"model": "alpha", "messages": MESSAGES})
        assert r.status_code == 200
        answers = []
        for path in (f"/admin/usage?key_id={b['id']}", f"/admin/usage?key_id={a['id']}",
                     "/admin/usage", f"/admin/keys/{b['id']}", "/admin/keys/key_doesnotexist0"):
            r = await h.get(path, headers=bearer(a["key"]))
            openai_error(r, 403, "admin_only", "permission_error")
            assert b["id"] not in r.text and "team-b" not in r.text
            answers.append(r.json())
        # The refusal is the same whether the other key exists or not.
        assert all(x == answers[0] for x in answers)


async def test_unknown_revoked_expired_and_malformed_keys_get_identical_answers(gateway_factory):
    """No existence oracle: the same status, body and headers (but the request id and
    the date), in similar time."""
    async with access_stack(gateway_factory) as (gw, h, mock):
        revoked = await create_key(h, name="revoked")
        await revoke(h, revoked["id"])
        expired = await create_key(h, name="expired", expires_at=time.time() - 60)
        near_miss = revoked["key"][:-2] + ("AA" if revoked["key"][-2:] != "AA" else "BB")
        keys = {"unknown": "gw-" + "x" * 43, "revoked": revoked["key"],
                "expired": expired["key"], "malformed": "gw-!!not-a-key!!",
                "near miss of a real key": near_miss, "short": "gw-"}

        async def answer(path: str, headers: dict[str, str], body: dict) -> tuple:
            r = await h.post(path, headers=headers, json=body)
            hdrs = sorted((k, v) for k, v in r.headers.items()
                          if k not in ("x-request-id", "date"))
            return r.status_code, r.content, hdrs

        for path, make, body in (
                ("/v1/chat/completions", bearer, {"model": "alpha", "messages": MESSAGES}),
                ("/v1/messages", lambda k: {"x-api-key": k},
                 {"model": "alpha", "max_tokens": 5, "messages": MESSAGES}),
                ("/admin/keys", bearer, {"name": "x"})):
            seen = {who: await answer(path, make(k), body) for who, k in keys.items()}
            first = next(iter(seen.values()))
            assert first[0] == 401, first
            for who, got in seen.items():
                assert got == first, (path, who, got, first)

        # Timing: each kind of key, repeated and interleaved; medians compared.
        times: dict[str, list[float]] = {who: [] for who in keys}
        for _ in range(30):
            for who, k in keys.items():
                t0 = time.perf_counter()
                r = await h.post("/v1/chat/completions", headers=bearer(k),
                                 json={"model": "alpha", "messages": MESSAGES})
                times[who].append(time.perf_counter() - t0)
                assert r.status_code == 401
        medians = {who: statistics.median(t) for who, t in times.items()}
        fastest, slowest = min(medians.values()), max(medians.values())
        assert slowest - fastest < max(0.002, fastest * 0.5), medians


# -- at rest -------------------------------------------------------------------------------


def _raw_files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


async def test_keys_are_stored_hashed_in_sqlite(gateway_factory, tmp_path):
    async with access_stack(gateway_factory) as (gw, h, mock):
        made = [await create_key(h, name=f"k{i}") for i in range(3)]
        await revoke(h, made[0]["id"])
        await h.post("/v1/chat/completions", headers=bearer(made[1]["key"]),
                     json={"model": "alpha", "messages": MESSAGES})
        await h.patch(f"/admin/keys/{made[2]['id']}", headers=bearer(MASTER), json={"rpm": 5})
    # What the gateway wrote: the SQLite file, its WAL, the spool (not our config file).
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "gateway.yaml"]
    assert any(p.name == "gateway.db" for p in written)
    raw = b"".join(p.read_bytes() for p in written)
    for m in made:
        assert m["key"].encode() not in raw
        assert m["key"][7:].encode() not in raw  # not even past the shown prefix
        assert hashlib.sha256(m["key"].encode()).hexdigest().encode() in raw
    for secret in (MASTER, NORMAL, RESTRICTED, UPSTREAM):
        assert secret.encode() not in raw


async def test_keys_are_stored_hashed_in_postgres(gateway_factory, postgres_server):
    import psycopg

    dsn = postgres_server.create_database()
    async with access_stack(gateway_factory, env={"DATABASE_URL": dsn}) as (gw, h, mock):
        made = [await create_key(h, name=f"k{i}", metadata={"team": "x"}) for i in range(3)]
        await revoke(h, made[0]["id"])
        r = await h.post("/v1/chat/completions", headers=bearer(made[1]["key"]),
                         json={"model": "alpha", "messages": MESSAGES})
        assert r.status_code == 200

    def dump() -> tuple[str, bytes]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            tables = [t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
            text = "\n".join(str(row) for t in tables
                             for row in conn.execute(f'SELECT t::text FROM "{t}" t').fetchall())
            conn.execute("CHECKPOINT")
            [(oid,)] = conn.execute("SELECT oid FROM pg_database WHERE datname = "
                                    "current_database()").fetchall()
        data = postgres_server.data
        return text, _raw_files(data / "base" / str(oid)) + _raw_files(data / "pg_wal")

    text, raw = await trio.to_thread.run_sync(dump)
    for m in made:
        assert m["id"] in text  # we are looking at the right database
        assert m["key"] not in text and m["key"][7:] not in text
        assert m["key"][7:].encode() not in raw
        assert hashlib.sha256(m["key"].encode()).hexdigest() in text
    for secret in (MASTER, NORMAL, RESTRICTED, UPSTREAM):
        assert secret not in text and secret.encode() not in raw
