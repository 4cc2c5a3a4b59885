"""The official openai SDK, pointed at the gateway, in front of a mock OpenAI upstream.

The SDK runs in a worker thread (its sync client); the gateway and the mock run in
the test's trio loop.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import httpx
import openai
import pytest
import trio

from tests.support.mock_openai import serve_mock_openai
from tests.support.sdk import track


@pytest.fixture(params=["native", "httpx"])
def upstream_transport(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both upstream transports."""
    return request.param


KEY = "gw-test-key-0001"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello to the gateway tests."}]


@asynccontextmanager
async def stack(gateway_factory, yaml_text=None, *, extra_env=None, **knobs):
    async with serve_mock_openai(**knobs) as mock:
        env = {"OPENAI_API_KEY": "sk-upstream-secret-1", "OPENAI_BASE_URL": mock.base_url,
               "GATEWAY_API_KEYS": KEY, **(extra_env or {})}
        if yaml_text:
            yaml_text = yaml_text.replace("MOCK_URL", mock.base_url)
        async with gateway_factory(yaml_text, env=env) as gw:
            yield gw, mock


def client(gw, key=KEY, **kw) -> openai.OpenAI:
    return track(openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, **kw))


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def test_chat_completion_round_trip(gateway_factory):
    async with stack(gateway_factory) as (gw, mock):
        c = client(gw)
        raw = await in_thread(c.chat.completions.with_raw_response.create,
                              model="gpt-4o-mini", messages=MESSAGES)
        completion = raw.parse()
        assert completion.choices[0].message.content == mock.reply
        assert completion.usage.completion_tokens == len(mock.reply.split())
        assert raw.headers["x-gateway-provider"] == "openai"
        assert raw.headers["x-gateway-model"] == "gpt-4o-mini"
        assert raw.headers["x-request-id"].startswith("req_")
        # The upstream got the provider key, never the gateway key.
        sent = mock.requests[-1]
        assert sent.headers["authorization"] == "Bearer sk-upstream-secret-1"
        assert sent.json["messages"] == MESSAGES
        c.close()


async def test_the_clients_bytes_go_upstream_unchanged_when_nothing_needs_rewriting(
        gateway_factory):
    # Spacing, key order and a field the gateway does not know survive byte for byte
    # (no copy, no re-serialising); a model the route renames gets the body re-written.
    yaml_text = ("models:\n  - name: house-model\n    deployments:\n"
                 "      - {provider: openai, model: gpt-4o-mini}\n")
    body = (b'{ "messages": [{"role": "user", "content": "hi"}],  "x_vendor_field": 1,'
            b' "model": "gpt-4o-mini" }')
    async with stack(gateway_factory, yaml_text) as (gw, mock):
        async with httpx.AsyncClient() as h:
            headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
            r = await h.post(f"{gw.base_url}/chat/completions", content=body, headers=headers)
            assert r.status_code == 200, r.text
            assert mock.requests[-1].body == body
            renamed = body.replace(b'"gpt-4o-mini"', b'"house-model"')
            r = await h.post(f"{gw.base_url}/chat/completions", content=renamed, headers=headers)
            assert r.status_code == 200, r.text
            sent = mock.requests[-1]
            assert sent.body != renamed and sent.json["model"] == "gpt-4o-mini"
            assert sent.json["x_vendor_field"] == 1


async def test_streaming_arrives_in_the_same_chunks_as_from_the_upstream(gateway_factory):
    async with stack(gateway_factory) as (gw, mock):
        def collect(c, **kw):
            with c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           stream=True, **kw) as s:
                return list(s)

        via_gateway = await in_thread(collect, client(gw))
        direct = await in_thread(collect, track(openai.OpenAI(base_url=mock.base_url, api_key="x")))
        deltas = [[ch.delta.content for ch in c.choices] for c in via_gateway]
        assert deltas == [[ch.delta.content for ch in c.choices] for c in direct]
        assert "".join(d[0] or "" for d in deltas if d) == mock.reply
        # The gateway asked the upstream for usage ...
        assert mock.requests[0].json["stream_options"] == {"include_usage": True}
        # ... and stripped it again, since this client did not ask.
        assert all(c.choices for c in via_gateway)
        with_usage = await in_thread(collect, client(gw), stream_options={"include_usage": True})
        assert with_usage[-1].choices == []
        assert with_usage[-1].usage.completion_tokens == len(mock.reply.split())
        log = await gw.log.wait_for(2, "/v1/chat/completions")
        assert [r["completion_tokens"] for r in log] == [len(mock.reply.split())] * 2
        assert all("ttft_ms" in r for r in log)


async def test_embeddings_and_models(gateway_factory):
    yaml_text = """
models:
  - name: embed-default
    deployments:
      - {provider: openai, model: text-embedding-3-small, base_url: MOCK_URL}
  - name: chat-default
    deployments:
      - {provider: openai, model: gpt-4o-mini, base_url: MOCK_URL}
"""
    async with stack(gateway_factory, yaml_text) as (gw, mock):
        c = client(gw)
        direct = track(openai.OpenAI(base_url=mock.base_url, api_key="x"))
        got = await in_thread(c.embeddings.create, model="embed-default",
                              input=["alpha", "beta"])
        want = await in_thread(direct.embeddings.create, model="text-embedding-3-small",
                               input=["alpha", "beta"])
        assert [d.embedding for d in got.data] == [d.embedding for d in want.data]
        assert mock.requests[0].json["model"] == "text-embedding-3-small"
        models = await in_thread(c.models.list)
        assert {m.id for m in models.data} == {"embed-default", "chat-default"}


async def test_missing_or_wrong_key_gets_openai_401(gateway_factory):
    async with stack(gateway_factory) as (gw, mock):
        for key in ("wrong-key-123456", ""):
            c = client(gw, key=key or "x")
            if not key:
                c = track(openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0,
                                        default_headers={"Authorization": ""}))
            with pytest.raises(openai.AuthenticationError) as err:
                await in_thread(c.chat.completions.create, model="gpt-4o-mini",
                                messages=MESSAGES)
            assert err.value.status_code == 401
            assert err.value.code == "invalid_api_key"
            assert err.value.body["type"] == "invalid_request_error"
        assert mock.counts == {}
        lines = await gw.log.wait_for(2, "/v1/chat/completions")
        assert [r["status"] for r in lines] == [401, 401]
        assert "wrong-key-123456" not in repr(lines)


async def test_upstream_500_is_retried_then_becomes_an_openai_error(gateway_factory):
    async with stack(gateway_factory, status=500) as (gw, mock):
        with pytest.raises(openai.InternalServerError) as err:
            await in_thread(client(gw).chat.completions.create, model="gpt-4o-mini",
                            messages=MESSAGES)
        assert err.value.status_code == 502
        assert err.value.body["code"] == "upstream_error"
        assert "500" in err.value.body["message"]
        assert mock.counts["/v1/chat/completions"] == 3  # retries: 2 -> three attempts


async def test_upstream_400_is_passed_on_without_retries(gateway_factory):
    async with stack(gateway_factory, status=400) as (gw, mock):
        with pytest.raises(openai.BadRequestError) as err:
            await in_thread(client(gw).chat.completions.create, model="gpt-4o-mini",
                            messages=MESSAGES)
        assert err.value.status_code == 400
        assert mock.counts["/v1/chat/completions"] == 1


async def test_upstream_hang_gives_504(gateway_factory):
    yaml_text = """
models:
  - name: slow
    timeout_s: 0.5
    retries: 0
    deployments:
      - {provider: openai, model: gpt-4o-mini, base_url: MOCK_URL}
"""
    async with stack(gateway_factory, yaml_text, hang=True) as (gw, mock):
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                await in_thread(client(gw).chat.completions.create, model="slow",
                                messages=MESSAGES, stream=stream)
            assert err.value.status_code == 504
            assert err.value.body["code"] == "upstream_timeout"
        with trio.fail_after(5):
            while mock.streams_aborted < 2:  # the gateway hung up on the upstream
                await trio.sleep(0.02)


async def test_unknown_model_and_bad_json_get_openai_errors(gateway_factory):
    async with stack(gateway_factory) as (gw, mock):
        with pytest.raises(openai.NotFoundError) as err:
            await in_thread(client(gw).chat.completions.create, model="no-such-model",
                            messages=MESSAGES)
        assert err.value.code == "model_not_found"
        async with httpx.AsyncClient() as h:
            r = await h.post(f"{gw.base_url}/chat/completions", content=b"{nope",
                             headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "invalid_json"
            r = await h.post(f"{gw.base_url}/chat/completions", json={"model": "gpt-4o-mini"},
                             headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "messages"


async def test_client_disconnect_mid_stream_cancels_the_upstream_at_once(gateway_factory):
    async with stack(gateway_factory, tokens_per_s=5) as (gw, mock):
        async with httpx.AsyncClient() as h:
            async with h.stream("POST", f"{gw.base_url}/chat/completions",
                                headers={"authorization": f"Bearer {KEY}"},
                                json={"model": "gpt-4o-mini", "messages": MESSAGES,
                                      "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break  # got the first event; now walk away
        gone = trio.current_time()
        with trio.fail_after(2):
            await mock.aborted.wait()
        assert trio.current_time() - gone < 0.5  # well before the next token (0.2 s)
        assert mock.streams_completed == 0


async def test_keepalive_pings_while_waiting_for_the_first_token(gateway_factory):
    env = {"GATEWAY_PORT": "0"}
    yaml_text = "server: {stream_keepalive_s: 0.1}\n"
    async with stack(gateway_factory, yaml_text, extra_env=env,
                     first_byte_delay_s=0.45) as (gw, mock):
        async with httpx.AsyncClient() as h:
            async with h.stream("POST", f"{gw.base_url}/chat/completions",
                                headers={"authorization": f"Bearer {KEY}"},
                                json={"model": "gpt-4o-mini", "messages": MESSAGES,
                                      "stream": True}) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines() if line]
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
        pings = [line for line in lines[:first_data] if line == ": ping"]
        assert len(pings) >= 3
        assert lines[-1] == "data: [DONE]"
        assert ": ping" not in lines[first_data:]
