"""The mock Anthropic upstream speaks a format the official `anthropic` SDK accepts,
and the gateway's Anthropic adapter talks to it.

The SDK client is synchronous and runs in a worker thread (`trio.to_thread`), while
the mock serves on the test's trio loop.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import anthropic
import httpx
import orjson
import pytest
import trio
import trio.testing

from gwcore.config import Deployment
from gwcore.providers import anthropic as adapter
from gwnative import SSEParser
from tests.support.mock_anthropic import (
    DEFAULT_REPLY,
    TOOL_PREAMBLE,
    MockAnthropic,
    input_tokens_for,
    serve_mock_anthropic,
)
from tests.support.mock_openai import reply_words

T = TypeVar("T")

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello to the gateway tests."}]
TOOL_MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris? Please call a tool."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture
async def upstream() -> Any:
    async with serve_mock_anthropic() as mock:
        yield mock


@pytest.fixture
async def client(upstream: MockAnthropic) -> Any:
    with anthropic.Anthropic(base_url=upstream.base_url, api_key="sk-ant-x", max_retries=0, timeout=10) as sdk:
        yield sdk


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_a_message_parses_with_the_sdk(upstream: MockAnthropic, client: anthropic.Anthropic) -> None:
    message = await in_thread(lambda: client.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES))

    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-x"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == DEFAULT_REPLY
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == input_tokens_for({"messages": MESSAGES})
    assert message.usage.output_tokens == len(reply_words(DEFAULT_REPLY))
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (0, 0)
    assert message._request_id is not None and message._request_id.startswith("req_")
    [recorded] = upstream.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/messages")
    assert recorded.headers["authorization"] == "Bearer sk-ant-x"  # the SDK 2.x's way
    assert recorded.headers["anthropic-version"]
    assert upstream.counts["/v1/messages"] == 1


async def test_max_tokens_cuts_the_reply(client: anthropic.Anthropic) -> None:
    message = await in_thread(lambda: client.messages.create(model="claude-x", max_tokens=3, messages=MESSAGES))

    assert message.content[0].text == "".join(reply_words(DEFAULT_REPLY)[:3])
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


async def test_a_stream_concatenates_to_the_reply(upstream: MockAnthropic, client: anthropic.Anthropic) -> None:
    def stream_all() -> tuple[str, anthropic.types.Message]:
        with client.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES) as stream:
            return "".join(stream.text_stream), stream.get_final_message()

    text, final = await in_thread(stream_all)

    assert text == DEFAULT_REPLY
    assert final.content[0].text == DEFAULT_REPLY
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == input_tokens_for({"messages": MESSAGES})
    assert final.usage.output_tokens == len(reply_words(DEFAULT_REPLY))
    # The client may finish reading before the mock's task has recorded the end.
    await trio.testing.wait_all_tasks_blocked()
    assert (upstream.streams_started, upstream.streams_completed, upstream.streams_aborted) == (1, 1, 0)


async def test_the_raw_stream_is_anthropic_sse(upstream: MockAnthropic) -> None:
    upstream.reply = "one two"
    body = {"model": "claude-x", "max_tokens": 10, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient() as http:
        response = await http.post(upstream.base_url + "/v1/messages", json=body, headers=headers)

    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["request-id"].startswith("req_")
    events = SSEParser().feed(response.content)
    assert [e.event for e in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    assert all(orjson.loads(e.data)["type"] == e.event for e in events)
    deltas = [orjson.loads(e.data)["delta"] for e in events if e.event == "content_block_delta"]
    assert [d["text"] for d in deltas] == ["one ", "two"]


async def test_a_tool_call_parses_with_the_sdk(client: anthropic.Anthropic) -> None:
    message = await in_thread(
        lambda: client.messages.create(model="claude-x", max_tokens=100, messages=TOOL_MESSAGES, tools=[WEATHER_TOOL])
    )

    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == TOOL_PREAMBLE
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    assert call.input == {"city": "mock", "unit": "celsius"}


async def test_a_streamed_tool_call_reassembles_from_json_fragments(
    upstream: MockAnthropic, client: anthropic.Anthropic
) -> None:
    def stream_all() -> tuple[list[Any], anthropic.types.Message]:
        with client.messages.stream(
            model="claude-x", max_tokens=100, messages=TOOL_MESSAGES, tools=[WEATHER_TOOL]
        ) as stream:
            return list(stream), stream.get_final_message()

    events, final = await in_thread(stream_all)

    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    fragments = [d.partial_json for d in deltas if d.type == "input_json_delta"]
    assert len(fragments) > 2
    assert final.content[1].type == "tool_use"
    assert final.content[1].input == {"city": "mock", "unit": "celsius"}
    assert final.stop_reason == "tool_use"


async def test_tools_without_the_trigger_phrase_get_a_text_answer(client: anthropic.Anthropic) -> None:
    message = await in_thread(
        lambda: client.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES, tools=[WEATHER_TOOL])
    )
    assert [b.type for b in message.content] == ["text"]


async def test_prompt_caching_writes_then_reads_the_marked_prefix(client: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are a careful assistant. " * 20, "cache_control": {"type": "ephemeral"}}]

    def create() -> anthropic.types.Message:
        return client.messages.create(model="claude-x", max_tokens=10, system=system, messages=MESSAGES)

    first = await in_thread(create)
    second = await in_thread(create)

    prefix_tokens = len(system[0]["text"]) // 4
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (prefix_tokens, 0)
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (0, prefix_tokens)
    total = input_tokens_for({"system": system, "messages": MESSAGES})
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total


async def test_a_forced_529_raises_overloaded(upstream: MockAnthropic, client: anthropic.Anthropic) -> None:
    upstream.status = 529

    with pytest.raises(anthropic.InternalServerError) as caught:
        await in_thread(lambda: client.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES))

    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == 529
    assert caught.value.type == "overloaded_error"
    assert caught.value.request_id is not None


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [(429, anthropic.RateLimitError, "rate_limit_error"), (500, anthropic.InternalServerError, "api_error")],
)
async def test_forced_errors_are_anthropic_errors(
    upstream: MockAnthropic, client: anthropic.Anthropic, status: int, error: type, kind: str
) -> None:
    upstream.status = status
    upstream.retry_after = "7"

    with pytest.raises(error) as caught:
        await in_thread(lambda: client.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES))

    assert caught.value.type == kind
    assert caught.value.response.headers["retry-after"] == "7"


async def test_missing_credentials_or_version_are_rejected_like_anthropic(upstream: MockAnthropic) -> None:
    body = {"model": "claude-x", "max_tokens": 10, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=upstream.base_url) as http:
        no_key = await http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
        no_version = await http.post("/v1/messages", json=body, headers={"x-api-key": "k"})
        no_max = await http.post(
            "/v1/messages", json={"model": "m", "messages": MESSAGES},
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        )
        elsewhere = await http.get("/v1/models", headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})

    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert no_version.status_code == 400 and no_version.json()["error"]["type"] == "invalid_request_error"
    assert no_max.status_code == 400 and no_max.json()["error"]["message"] == "max_tokens: Field required"
    assert elsewhere.status_code == 404 and elsewhere.json()["type"] == "error"


async def test_a_client_that_closes_mid_stream_is_counted_as_aborted(
    upstream: MockAnthropic, client: anthropic.Anthropic
) -> None:
    upstream.reply = " ".join(["word"] * 500)
    upstream.tokens_per_s = 100  # 5 s of stream: the client leaves long before the end

    def read_a_few_then_close() -> list[Any]:
        stream = client.messages.create(model="claude-x", max_tokens=1000, messages=MESSAGES, stream=True)
        got = [next(stream) for _ in range(4)]
        stream.close()
        return got

    got = await in_thread(read_a_few_then_close)
    with trio.fail_after(5):
        await upstream.aborted.wait()

    assert [e.type for e in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
    ]
    assert (upstream.streams_started, upstream.streams_completed, upstream.streams_aborted) == (1, 0, 1)


# -- the gateway's adapter against the mock ---------------------------------------------

DEP = Deployment(provider="anthropic", model="claude-sonnet-4-5")


async def test_the_adapters_request_is_accepted_and_its_answers_translate(upstream: MockAnthropic) -> None:
    body = {
        "model": "chat-default",
        "messages": [{"role": "system", "content": "Be brief."}, *TOOL_MESSAGES],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]}}
        ],
    }
    whole_req = adapter.build_chat(body, DEP, upstream.base_url, "sk-ant-gw")
    stream_req = adapter.build_chat({**body, "stream": True}, DEP, upstream.base_url, "sk-ant-gw")
    async with httpx.AsyncClient() as http:
        whole = await http.post(whole_req.url, content=whole_req.body, headers=whole_req.headers)
        streamed = await http.post(stream_req.url, content=stream_req.body, headers=stream_req.headers)

    assert upstream.requests[0].headers["x-api-key"] == "sk-ant-gw"
    assert upstream.requests[0].json["model"] == "claude-sonnet-4-5"
    assert whole.status_code == 200 and streamed.status_code == 200
    completion, usage = adapter.parse_chat(whole.content, "chat-default", 1)
    message = orjson.loads(completion)["choices"][0]["message"]
    assert message["content"] == TOOL_PREAMBLE
    [call] = message["tool_calls"]
    assert orjson.loads(call["function"]["arguments"]) == {"city": "mock", "unit": "celsius"}

    translator = adapter.StreamTranslator("chat-default", True, 1)
    frames = b"".join(f for e in SSEParser().feed(streamed.content) for f in translator.feed(e))
    assert translator.done and frames.endswith(b"data: [DONE]\n\n")
    arguments = "".join(
        c["function"].get("arguments", "")
        for e in SSEParser().feed(frames)[:-1]
        for choice in orjson.loads(e.data)["choices"]
        for c in choice["delta"].get("tool_calls") or []
    )
    assert orjson.loads(arguments) == {"city": "mock", "unit": "celsius"}
    assert translator.usage == usage


async def test_the_adapter_maps_the_mocks_errors(upstream: MockAnthropic) -> None:
    req = adapter.build_chat({"messages": MESSAGES}, DEP, upstream.base_url, "k")
    async with httpx.AsyncClient() as http:
        upstream.status = 529
        overloaded = await http.post(req.url, content=req.body, headers=req.headers)
        upstream.status = 429
        upstream.retry_after = "2"
        limited = await http.post(req.url, content=req.body, headers=req.headers)

    error = adapter.map_error(overloaded.status_code, overloaded.content, list(overloaded.headers.items()))
    assert (error.status, error.code) == (503, "upstream_unavailable")
    error = adapter.map_error(limited.status_code, limited.content, list(limited.headers.items()))
    assert (error.status, error.code, error.headers) == (429, "rate_limit_exceeded", [("retry-after", "2")])
