"""Every ingress x upstream pair through the real gateway, driven by the official SDKs.

Ingress: the `openai` SDK on /v1/chat/completions and the `anthropic` SDK on
/v1/messages.  Upstream: mock OpenAI, Anthropic and Gemini servers speaking their real
wire formats.  Each pair is run plain and streamed, with a text answer and a tool call.
"""
from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager

import anthropic
import openai
import pytest

from tests.integration.test_openai_sdk import KEY, in_thread
from tests.support.mock_anthropic import serve_mock_anthropic
from tests.support.mock_gemini import serve_mock_gemini
from tests.support.mock_openai import serve_mock_openai
from tests.support.sdk import track


@pytest.fixture(params=["native", "httpx"])
def upstream_transport(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both upstream transports."""
    return request.param


UPSTREAMS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest",
             "google": "gemini-2.0-flash"}
CONFIG = """
models:
  - name: via-openai
    retries: 0
    deployments: [{provider: openai, model: gpt-4o-mini, base_url: URL_openai, api_key: sk-o-123}]
  - name: via-anthropic
    retries: 0
    deployments: [{provider: anthropic, model: claude-3-5-haiku-latest, base_url: URL_anthropic, api_key: sk-a-123}]
  - name: via-google
    retries: 0
    deployments: [{provider: google, model: gemini-2.0-flash, base_url: URL_google, api_key: g-key-123}]
"""
WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@asynccontextmanager
async def matrix(gateway_factory):
    async with AsyncExitStack() as stack:
        mocks = {"openai": await stack.enter_async_context(serve_mock_openai()),
                 "anthropic": await stack.enter_async_context(serve_mock_anthropic()),
                 "google": await stack.enter_async_context(serve_mock_gemini())}
        text = CONFIG
        for name, mock in mocks.items():
            text = text.replace(f"URL_{name}", mock.base_url)
        gw = await stack.enter_async_context(gateway_factory(text, env={"GATEWAY_API_KEYS": KEY}))
        yield gw, mocks


def openai_client(gw) -> openai.OpenAI:
    return track(openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0))


def anthropic_client(gw) -> anthropic.Anthropic:
    return track(anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0))


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_openai_sdk_to_every_upstream(gateway_factory, upstream, stream):
    async with matrix(gateway_factory) as (gw, mocks):
        mock = mocks[upstream]
        c = openai_client(gw)
        model = f"via-{upstream}"
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello there, gateway."}]

        def run(**kw):
            if not stream:
                return c.chat.completions.create(model=model, messages=messages, **kw)
            with c.chat.completions.create(model=model, messages=messages, stream=True,
                                           stream_options={"include_usage": True}, **kw) as s:
                return list(s)

        got = await in_thread(run)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices)
            usage = got[-1].usage
        else:
            text, usage = got.choices[0].message.content, got.usage
        assert text == mock.reply
        assert usage.completion_tokens > 0 and usage.prompt_tokens > 0
        # A tool call.
        messages[-1]["content"] = "Please call a tool for Paris."
        got = await in_thread(run, tools=[{"type": "function", "function": WEATHER}])
        if stream:
            calls: dict[int, dict] = {}
            for ch in got:
                for choice in ch.choices:
                    for tc in choice.delta.tool_calls or []:
                        entry = calls.setdefault(tc.index, {"name": "", "args": ""})
                        entry["name"] += tc.function.name or ""
                        entry["args"] += tc.function.arguments or ""
            finish = [ch.choices[0].finish_reason for ch in got if ch.choices and ch.choices[0].finish_reason]
            call = calls[0]
        else:
            tc = got.choices[0].message.tool_calls[0]
            call = {"name": tc.function.name, "args": tc.function.arguments}
            finish = [got.choices[0].finish_reason]
        assert call["name"] == "get_weather"
        assert isinstance(json.loads(call["args"]), dict)
        assert finish == ["tool_calls"]
        assert mock.counts  # the request really went to this upstream


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_anthropic_sdk_to_every_upstream(gateway_factory, upstream, stream):
    async with matrix(gateway_factory) as (gw, mocks):
        mock = mocks[upstream]
        c = anthropic_client(gw)
        model = f"via-{upstream}"

        def run(content, **kw):
            messages = [{"role": "user", "content": content}]
            if not stream:
                return c.messages.create(model=model, max_tokens=200, system="Be brief.",
                                         messages=messages, **kw)
            with c.messages.stream(model=model, max_tokens=200, system="Be brief.",
                                   messages=messages, **kw) as s:
                for _ in s:
                    pass
                return s.get_final_message()

        msg = await in_thread(run, "Hello there, gateway.")
        assert "".join(b.text for b in msg.content if b.type == "text") == mock.reply
        assert msg.stop_reason == "end_turn"
        assert msg.usage.output_tokens > 0
        tool = {"name": WEATHER["name"], "description": WEATHER["description"],
                "input_schema": WEATHER["parameters"]}
        msg = await in_thread(run, "Please call a tool for Paris.", tools=[tool])
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert uses and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
        assert msg.stop_reason == "tool_use"


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
async def test_streamed_and_plain_calls_cost_the_same(gateway_factory, upstream):
    async with matrix(gateway_factory) as (gw, mocks):
        c = openai_client(gw)
        messages = [{"role": "user", "content": "Tell me something short about the sea."}]
        await in_thread(c.chat.completions.create, model=f"via-{upstream}", messages=messages)

        def streamed():
            with c.chat.completions.create(model=f"via-{upstream}", messages=messages,
                                           stream=True) as s:
                return list(s)

        await in_thread(streamed)
        plain, streamed_line = await gw.log.wait_for(2, "/v1/chat/completions")
        for field in ("prompt_tokens", "completion_tokens", "cost_usd"):
            assert plain[field] == streamed_line[field], field
        assert plain["cost_usd"] > 0


async def test_messages_errors_come_in_anthropic_format(gateway_factory):
    async with matrix(gateway_factory) as (gw, mocks):
        bad = track(anthropic.Anthropic(base_url=gw.url, api_key="wrong-key-1234", max_retries=0))
        with pytest.raises(anthropic.AuthenticationError) as err:
            await in_thread(bad.messages.create, model="via-openai", max_tokens=10,
                            messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["type"] == "error"
        assert err.value.body["error"]["type"] == "authentication_error"
        c = anthropic_client(gw)
        with pytest.raises(anthropic.NotFoundError) as err:
            await in_thread(c.messages.create, model="no-such-model", max_tokens=10,
                            messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["error"]["type"] == "not_found_error"
        # An untranslatable field is a 400 naming it, never a silently different request.
        with pytest.raises(anthropic.BadRequestError) as err:
            await in_thread(c.messages.create, model="via-openai", max_tokens=10, extra_body={"top_k": 5},
                            messages=[{"role": "user", "content": "hi"}])
        assert "top_k" in err.value.message
        assert mocks["openai"].counts == {}
        # The upstream's own error, in Anthropic's format.
        mocks["google"].status = 429
        with pytest.raises(anthropic.RateLimitError):
            await in_thread(c.messages.create, model="via-google", max_tokens=10,
                            messages=[{"role": "user", "content": "hi"}])


async def test_messages_accepts_x_api_key(gateway_factory):
    import httpx

    async with matrix(gateway_factory) as (gw, mocks):
        async with httpx.AsyncClient() as h:
            r = await h.post(f"{gw.url}/v1/messages", headers={"x-api-key": KEY},
                             json={"model": "via-anthropic", "max_tokens": 50,
                                   "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["type"] == "message"
        sent = mocks["anthropic"].requests[-1]
        assert sent.headers["x-api-key"] == "sk-a-123"  # the provider key, not the caller's
        assert sent.json["model"] == "claude-3-5-haiku-latest"
