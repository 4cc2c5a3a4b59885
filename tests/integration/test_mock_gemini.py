"""The mock Gemini upstream speaks a format the official `google-genai` SDK accepts.

The SDK client is synchronous and runs in a worker thread (`trio.to_thread`), while
the mock serves on the test's trio loop. The SDK talks to `v1` unless told otherwise;
the gateway uses `v1beta`, so the client is pinned to it. Retries are off (one attempt).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import httpx
import orjson
import pytest
import trio
import trio.testing
from google import genai
from google.genai import errors, types

from gwcore.config import Deployment
from gwcore.providers import google
from gwnative import SSEParser
from tests.support.mock_gemini import DEFAULT_REPLY, MockGemini, serve_mock_gemini

T = TypeVar("T")
MODEL = "gemini-2.0-flash"
WEATHER = types.FunctionDeclaration(
    name="get_weather",
    description="Current weather in a city.",
    parameters=types.Schema(
        type=types.Type.OBJECT,
        properties={
            "city": types.Schema(type=types.Type.STRING),
            "unit": types.Schema(type=types.Type.STRING, enum=["celsius", "fahrenheit"]),
        },
        required=["city", "unit"],
    ),
)


@pytest.fixture
async def upstream() -> Any:
    async with serve_mock_gemini(api_key="x") as mock:
        yield mock


def make_client(mock: MockGemini, api_key: str = "x") -> genai.Client:
    options = types.HttpOptions(
        base_url=mock.base_url, api_version="v1beta", timeout=10_000,
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key=api_key, http_options=options)


@pytest.fixture
def client(upstream: MockGemini) -> Any:
    with make_client(upstream) as sdk:
        yield sdk


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_generate_content_parses_with_the_sdk(upstream: MockGemini, client: genai.Client) -> None:
    response = await in_thread(lambda: client.models.generate_content(
        model=MODEL, contents="Say hello to the gateway tests.",
        config=types.GenerateContentConfig(system_instruction="Be brief."),
    ))

    assert response.text == DEFAULT_REPLY
    [candidate] = response.candidates
    assert candidate.finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage.candidates_token_count == len(DEFAULT_REPLY.split())
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.response_id and response.model_version == MODEL
    [request] = upstream.requests
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "x"
    assert request.json["systemInstruction"]["parts"] == [{"text": "Be brief."}]


async def test_generate_content_stream_concatenates_to_the_reply(upstream: MockGemini, client: genai.Client) -> None:
    chunks = await in_thread(lambda: list(client.models.generate_content_stream(
        model=MODEL, contents="Say hello to the gateway tests.")))

    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == DEFAULT_REPLY
    assert [c.candidates[0].finish_reason for c in chunks][-1] == types.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    usage = chunks[-1].usage_metadata
    assert usage.candidates_token_count == len(DEFAULT_REPLY.split())
    assert chunks[0].usage_metadata.candidates_token_count is None
    assert upstream.queries == ["alt=sse"]
    # The SDK may have read the last byte before the mock's task notes the stream done.
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.streams_completed == 1


async def test_function_calling_round_trip(upstream: MockGemini, client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[WEATHER])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    asked = types.Content(role="user", parts=[types.Part(text="Weather in Paris? Please call a tool.")])
    response = await in_thread(lambda: client.models.generate_content(model=MODEL, contents=[asked], config=config))

    [call] = response.function_calls
    assert call.name == "get_weather"
    assert call.args == {"city": "mock", "unit": "celsius"}

    answer = types.Content(role="user", parts=[
        types.Part.from_function_response(name="get_weather", response={"result": "sunny"})])
    contents = [asked, response.candidates[0].content, answer]
    final = await in_thread(lambda: client.models.generate_content(model=MODEL, contents=contents, config=config))
    assert final.text == DEFAULT_REPLY
    assert upstream.requests[1].json["contents"][2]["parts"][0]["functionResponse"]["name"] == "get_weather"


async def test_a_streamed_function_call(upstream: MockGemini, client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[WEATHER])],
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY")),
    )
    chunks = await in_thread(lambda: list(client.models.generate_content_stream(
        model=MODEL, contents="Weather in Paris?", config=config)))

    [chunk] = chunks
    assert [c.name for c in chunk.function_calls] == ["get_weather"]
    assert chunk.candidates[0].finish_reason == types.FinishReason.STOP


async def test_a_forced_500_is_a_server_error(upstream: MockGemini, client: genai.Client) -> None:
    upstream.status = 500
    with pytest.raises(errors.ServerError) as info:
        await in_thread(lambda: client.models.generate_content(model=MODEL, contents="hi"))
    assert info.value.code == 500
    assert info.value.status == "INTERNAL"
    assert len(upstream.requests) == 1  # not retried


async def test_a_forced_429_carries_retry_info(upstream: MockGemini, client: genai.Client) -> None:
    upstream.status, upstream.retry_after = 429, 3
    with pytest.raises(errors.ClientError) as info:
        await in_thread(lambda: client.models.generate_content(model=MODEL, contents="hi"))
    assert info.value.code == 429
    assert info.value.status == "RESOURCE_EXHAUSTED"
    assert info.value.details["error"]["details"][0]["retryDelay"] == "3s"


async def test_a_wrong_key_is_refused_as_google_does(upstream: MockGemini) -> None:
    with make_client(upstream, api_key="wrong") as sdk:
        with pytest.raises(errors.ClientError) as info:
            await in_thread(lambda: sdk.models.generate_content(model=MODEL, contents="hi"))
    assert info.value.code == 400
    assert info.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


# -- the gateway's Google adapter against the mock, over real HTTP ---------------------

def _send(req: Any) -> tuple[int, bytes]:
    with httpx.Client(timeout=10) as http:
        resp = http.request(req.method, req.url, headers=req.headers, content=req.body)
        return resp.status_code, resp.content


async def test_the_google_adapter_round_trips_through_the_mock(upstream: MockGemini) -> None:
    dep = Deployment(provider="google", model=MODEL)
    body = {"model": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Say hello."}]}

    status, raw = await in_thread(lambda: _send(google.build_chat(body, dep, upstream.base_url, "x")))
    assert status == 200
    completion, usage = google.parse_chat(raw, "chat", 1)
    assert orjson.loads(completion)["choices"][0]["message"]["content"] == DEFAULT_REPLY

    stream_req = google.build_chat({**body, "stream": True}, dep, upstream.base_url, "x")
    status, raw = await in_thread(lambda: _send(stream_req))
    assert status == 200 and b"\r\n\r\n" in raw
    tr = google.StreamTranslator("chat", True, 1)
    frames = [f for e in SSEParser().feed(raw) for f in tr.feed(e)] + tr.close()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in
                   (orjson.loads(f[6:]) for f in frames[:-1]) if c["choices"])
    assert text == DEFAULT_REPLY
    assert tr.done and tr.usage == usage

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}]
    asked = {"model": "chat", "messages": [{"role": "user", "content": "Please call a tool."}], "tools": tools}
    status, raw = await in_thread(lambda: _send(google.build_chat(asked, dep, upstream.base_url, "x")))
    [call] = orjson.loads(google.parse_chat(raw, "chat", 1)[0])["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"mock"}'}

    upstream.status, upstream.retry_after = 429, 2
    status, raw = await in_thread(lambda: _send(google.build_chat(body, dep, upstream.base_url, "x")))
    err = google.map_error(status, raw, [])
    assert (err.status, err.headers) == (429, [("retry-after", "2")])
