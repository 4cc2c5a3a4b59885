"""Dynamic keys through the admin API and the CLI, budgets, and usage from the audit log
(embedded default: the SQLite store)."""
from __future__ import annotations

import httpx
import openai
import pytest
import trio

from tests.integration.test_openai_sdk import MESSAGES, in_thread
from tests.support.mock_openai import serve_mock_openai
from tests.support.procs import gwcore
from tests.support.redis import redis_server  # noqa: F401  (the fixture)
from tests.support.sdk import track

MASTER = "master-key-for-tests-1"
STATIC = "static-key-for-tests-1"


async def admin(gw, method, path, **kw):
    async with httpx.AsyncClient(base_url=gw.url) as h:
        return await h.request(method, path, headers={"authorization": f"Bearer {MASTER}"}, **kw)


def sdk(gw, key):
    return track(openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0))


async def gateway(gateway_factory, mock, text=""):
    env = {"OPENAI_API_KEY": "sk-upstream-1", "OPENAI_BASE_URL": mock.base_url,
           "GATEWAY_MASTER_KEY": MASTER, "GATEWAY_API_KEYS": STATIC}
    return gateway_factory(text or None, env=env)


async def test_admin_routes_need_the_master_key(gateway_factory):
    async with serve_mock_openai() as mock, await gateway(gateway_factory, mock) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as h:
            for method, path in (("POST", "/admin/keys"), ("GET", "/admin/keys"),
                                 ("GET", "/admin/keys/key_0123456789abcdef"),
                                 ("PATCH", "/admin/keys/x"), ("DELETE", "/admin/keys/x"),
                                 ("GET", "/admin/usage")):
                r = await h.request(method, path, headers={"authorization": f"Bearer {STATIC}"},
                                    json={"name": "x"} if method in ("POST", "PATCH") else None)
                assert r.status_code == 403, (method, path)
                assert r.json()["error"]["code"] == "admin_only"
                r = await h.request(method, path)
                assert r.status_code == 401


async def test_key_lifecycle_through_the_admin_api(gateway_factory):
    async with serve_mock_openai() as mock, await gateway(gateway_factory, mock) as gw:
        r = await admin(gw, "POST", "/admin/keys",
                        json={"name": "team-x", "models": ["gpt-4o-mini"], "rpm": 100,
                              "metadata": {"team": "x"}})
        assert r.status_code == 201
        created = r.json()
        key, key_id = created["key"], created["id"]
        assert key.startswith("gw-") and created["prefix"] == key[:7]
        listed = (await admin(gw, "GET", "/admin/keys")).json()["data"]
        assert [k["id"] for k in listed] == [key_id]
        assert key not in repr(listed) and "hash" not in repr(listed)
        # The new key works, for its models only.
        c = sdk(gw, key)
        reply = await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
        assert reply.choices[0].message.content == mock.reply
        with pytest.raises(openai.PermissionDeniedError):
            await in_thread(c.chat.completions.create, model="gpt-4o", messages=MESSAGES)
        r = await admin(gw, "PATCH", f"/admin/keys/{key_id}", json={"models": None, "rpm": 1})
        assert r.status_code == 200 and r.json()["rpm"] == 1 and r.json()["models"] is None
        await in_thread(c.chat.completions.create, model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):  # rpm 1 now
            await in_thread(c.chat.completions.create, model="gpt-4o", messages=MESSAGES)
        assert (await admin(gw, "GET", f"/admin/keys/{key_id}")).json()["name"] == "team-x"
        assert (await admin(gw, "DELETE", f"/admin/keys/{key_id}")).status_code == 200
        with pytest.raises(openai.AuthenticationError):  # at once on this worker
            await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
        assert (await admin(gw, "GET", f"/admin/keys/{key_id}")).json()["revoked"] is True
        assert (await admin(gw, "DELETE", "/admin/keys/key_nope")).status_code == 404
        # At rest the key exists only as its hash.
        db = gw.app.cfg.storage.sqlite_path
        for path in (db, db + "-wal"):
            try:
                with open(path, "rb") as f:
                    assert key.encode() not in f.read()
            except FileNotFoundError:
                continue
        r = await admin(gw, "POST", "/admin/keys", json={"rpm": -1})
        assert r.status_code == 400


async def test_a_key_over_its_budget_gets_insufficient_quota(gateway_factory):
    async with serve_mock_openai() as mock, await gateway(gateway_factory, mock) as gw:
        # gpt-4o-mini: a call here costs about 7e-6 USD and reserves about 1.2e-5
        # beforehand (max_tokens 10 at the output price plus the prompt).
        budget = 0.00005
        r = await admin(gw, "POST", "/admin/keys", json={"name": "tight", "budget_usd": budget})
        c = sdk(gw, r.json()["key"])
        calls = 0
        with pytest.raises(openai.RateLimitError) as err:
            for _ in range(20):
                await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                messages=MESSAGES, max_tokens=10)
                calls += 1
        assert err.value.code == "insufficient_quota"
        assert 3 <= calls < 20 and mock.counts["/v1/chat/completions"] == calls
        spent = sum(line.get("cost_usd", 0)
                    for line in await gw.log.wait_for(calls, "/v1/chat/completions"))
        assert spent <= budget  # the reservation keeps one worker within the budget
        # A request whose estimate alone is past what is left is refused up front.
        r = await admin(gw, "POST", "/admin/keys", json={"name": "small", "budget_usd": 0.0001})
        with pytest.raises(openai.RateLimitError) as err:
            await in_thread(sdk(gw, r.json()["key"]).chat.completions.create,
                            model="gpt-4o-mini", messages=MESSAGES, max_tokens=100_000)
        assert err.value.code == "insufficient_quota"


async def test_usage_comes_from_the_audit_log(gateway_factory):
    async with serve_mock_openai() as mock, await gateway(gateway_factory, mock) as gw:
        key = (await admin(gw, "POST", "/admin/keys", json={"name": "u"})).json()
        c = sdk(gw, key["key"])
        for stream in (False, True, False):
            if stream:
                with await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                     messages=MESSAGES, stream=True) as s:
                    await in_thread(list, s)
            else:
                await in_thread(c.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await in_thread(sdk(gw, "gw-wrong-key-000").chat.completions.create,
                            model="gpt-4o-mini", messages=MESSAGES)
        with trio.fail_after(10):
            while True:
                rows = (await admin(gw, "GET", f"/admin/usage?key_id={key['id']}")).json()["data"]
                if rows and rows[0]["requests"] == 3:
                    break
                await trio.sleep(0.1)
        (row,) = rows
        assert row["model"] == "gpt-4o-mini" and row["completion_tokens"] == 3 * len(mock.reply.split())
        assert row["cost_usd"] > 0
        everything = (await admin(gw, "GET", "/admin/usage")).json()["data"]
        assert sum(r["requests"] for r in everything) >= 4  # the 401 is recorded too
        r = await admin(gw, "GET", "/admin/usage?since=yesterday")
        assert r.status_code == 400


def test_cli_keys_create_list_revoke(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"storage: {{sqlite_path: '{tmp_path}/gw.db', spool_dir: '{tmp_path}/spool'}}\n")
    r = gwcore("keys", "--config", str(cfg), "create", "--name", "ci", "--models", "a,b",
               "--budget-usd", "5")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("gw-")
    r = gwcore("keys", "--config", str(cfg), "list", "--json")
    import orjson
    (row,) = orjson.loads(r.stdout)
    assert row["name"] == "ci" and row["models"] == ["a", "b"] and row["budget_usd"] == 5.0
    assert key not in r.stdout
    r = gwcore("keys", "--config", str(cfg), "revoke", row["id"])
    assert r.returncode == 0
    r = gwcore("keys", "--config", str(cfg), "list")
    assert "revoked" in r.stdout
    assert gwcore("keys", "--config", str(cfg), "revoke", "key_nope").returncode == 1


async def test_redis_backed_limits_and_cache_in_the_gateway(gateway_factory, redis_server):
    redis_server.flush()
    text = ("keys:\n  - {key: rpm-key-for-redis, name: r, rpm: 2}\n"
            "cache: {enabled: true}\n")
    async with serve_mock_openai() as mock:
        env = {"OPENAI_API_KEY": "sk-upstream-1", "OPENAI_BASE_URL": mock.base_url,
               "REDIS_URL": redis_server.url}
        async with gateway_factory(text, env=env) as gw:
            c = sdk(gw, "rpm-key-for-redis")
            raw = await in_thread(c.chat.completions.with_raw_response.create,
                                  model="gpt-4o-mini", messages=MESSAGES)
            assert raw.headers["x-gateway-cache"] == "MISS"
            raw = await in_thread(c.chat.completions.with_raw_response.create,
                                  model="gpt-4o-mini", messages=MESSAGES)
            assert raw.headers["x-gateway-cache"] == "HIT"  # from Redis
            with pytest.raises(openai.RateLimitError):
                await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                messages=MESSAGES)
            assert mock.counts["/v1/chat/completions"] == 1
            async with httpx.AsyncClient() as h:
                ready = (await h.get(f"{gw.url}/readyz")).json()
                metrics = (await h.get(f"{gw.url}/metrics")).text
            assert ready["checks"]["redis"] == "ok"
            assert "gateway_redis_up 1" in metrics
            assert 'gateway_cost_usd_total{model="gpt-4o-mini",provider="openai"}' in metrics
            assert 'gateway_tokens_total{model="gpt-4o-mini",provider="openai",kind="prompt"}' in metrics
            assert "gateway_limiter_rejected_total 1" in metrics
            assert 'gateway_time_to_first_token_seconds' in metrics
