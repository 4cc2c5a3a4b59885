"""The mock OpenAI upstream speaks a format the official `openai` SDK accepts.

The SDK client is synchronous and runs in a worker thread (`trio.to_thread`),
while the mock serves on the test's trio loop.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import httpx
import openai
import pydantic
import pytest
import trio
from openai.types.responses import Response, ResponseStreamEvent

from tests.support.mock_openai import (
    DEFAULT_REPLY,
    MockOpenAI,
    embedding_for,
    input_tokens_for,
    prompt_tokens_for,
    reply_words,
    serve_mock_openai,
)

async def stream_counts(upstream: MockOpenAI, expected: tuple[int, int, int]) -> None:
    """The mock's (started, completed, aborted) stream counts reach ``expected``: the
    mock books a stream after its last write, which a fast client can read first."""
    with trio.move_on_after(5):
        while (upstream.streams_started, upstream.streams_completed,
               upstream.streams_aborted) != expected:
            await trio.sleep(0.01)
    assert (upstream.streams_started, upstream.streams_completed,
            upstream.streams_aborted) == expected


T = TypeVar("T")

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the gateway tests."},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TOOL_MESSAGES = [{"role": "user", "content": "What is the weather in Paris? Please call a tool."}]


@pytest.fixture
async def upstream() -> Any:
    async with serve_mock_openai() as mock:
        yield mock


@pytest.fixture
async def client(upstream: MockOpenAI) -> Any:
    with openai.OpenAI(base_url=upstream.base_url, api_key="x", max_retries=0, timeout=10) as sdk:
        yield sdk


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_a_chat_completion_parses_with_the_sdk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    raw = await in_thread(
        lambda: client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    )
    completion = raw.parse()

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == DEFAULT_REPLY
    assert choice.message.refusal is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens_for(MESSAGES)
    assert completion.usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.completion_tokens_details is not None
    assert completion.system_fingerprint
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-processing-ms"].isdigit()
    [recorded] = upstream.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer x"
    assert recorded.json["messages"] == MESSAGES
    assert upstream.counts["/v1/chat/completions"] == 1


async def test_n_choices_and_max_tokens_truncation(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    completion = await in_thread(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=2, max_tokens=3)
    )

    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.content == "".join(reply_words(DEFAULT_REPLY)[:3])
        assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2 * 3


async def test_streamed_deltas_concatenate_to_the_reply_and_end_with_usage(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    def stream_all() -> list[Any]:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        return list(stream)

    chunks = await in_thread(stream_all)

    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    assert len(chunks) == 1 + len(reply_words(DEFAULT_REPLY)) + 1 + 1  # role, words, finish, usage
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert all(c.usage is None for c in chunks[:-1])
    await stream_counts(upstream, (1, 1, 0))


async def test_a_stream_without_include_usage_has_no_usage_chunk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    def stream_all() -> list[Any]:
        return list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))

    chunks = await in_thread(stream_all)

    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY


async def test_the_raw_stream_is_openai_sse(upstream: MockOpenAI) -> None:
    upstream.reply = "one two"
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient() as http:
        response = await http.post(upstream.base_url + "/chat/completions", json=body)

    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    events = response.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert [p["choices"][0]["delta"] if p["choices"] else None for p in payloads] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "one "},
        {"content": "two"},
        {},
        None,
    ]
    assert all("usage" in p for p in payloads)


async def test_a_tool_call_parses_with_the_sdk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    completion = await in_thread(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=TOOL_MESSAGES, tools=[WEATHER_TOOL])
    )

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock", "unit": "celsius"}


async def test_tools_without_the_trigger_phrase_get_a_text_answer(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    completion = await in_thread(
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL])
    )

    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert completion.choices[0].message.tool_calls is None


async def test_a_streamed_tool_call_reassembles(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    def stream_all() -> list[Any]:
        return list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=TOOL_MESSAGES, tools=[WEATHER_TOOL], stream=True
            )
        )

    chunks = await in_thread(stream_all)

    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id is not None and calls[0].id.startswith("call_")
    assert calls[0].type == "function"
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert len(calls) > 2  # the arguments arrive in fragments
    assert all(call.index == 0 for call in calls)
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "mock", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_embeddings_in_the_sdk_default_base64_decode_to_the_deterministic_floats(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    inputs = ["hello", "gateway"]
    result = await in_thread(lambda: client.embeddings.create(model="text-embedding-3-small", input=inputs))

    assert upstream.requests[-1].json["encoding_format"] == "base64"  # what the SDK asks for by default
    assert [d.embedding for d in result.data] == [embedding_for(text) for text in inputs]
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.model == "text-embedding-3-small"
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0


async def test_embeddings_as_floats_match_the_base64_ones(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    result = await in_thread(
        lambda: client.embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="float")
    )

    assert result.data[0].embedding == embedding_for("hello")
    assert embedding_for("hello") != embedding_for("hello!")


async def test_the_models_list_parses_with_the_sdk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    models = await in_thread(lambda: list(client.models.list()))

    ids = {m.id for m in models}
    assert {"gpt-4o-mini", "text-embedding-3-small"} <= ids
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)


async def test_a_forced_500_raises_internal_server_error(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    upstream.status = 500

    with pytest.raises(openai.InternalServerError) as caught:
        await in_thread(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))

    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


async def test_a_forced_429_carries_retry_after(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    upstream.status = 429
    upstream.retry_after = "7"

    with pytest.raises(openai.RateLimitError) as caught:
        await in_thread(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))

    assert caught.value.response.headers["retry-after"] == "7"
    assert (caught.value.type, caught.value.code) == ("rate_limit_error", "rate_limit_exceeded")


async def test_a_forced_401_and_a_custom_error_body(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    upstream.status = 401
    with pytest.raises(openai.AuthenticationError) as caught:
        await in_thread(lambda: client.models.list())
    assert caught.value.code == "invalid_api_key"

    upstream.status = 429
    upstream.error_body = json.dumps(
        {"error": {"message": "quota", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    ).encode()
    with pytest.raises(openai.RateLimitError) as caught_quota:
        await in_thread(lambda: client.models.list())
    assert caught_quota.value.code == "insufficient_quota"

    upstream.reset()
    assert upstream.status is None and upstream.requests == []
    await in_thread(lambda: client.models.list())


async def test_unknown_paths_and_bad_json_get_openai_errors(upstream: MockOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        missing = await http.post(upstream.base_url + "/nope", json={})
        bad = await http.post(upstream.base_url + "/chat/completions", content=b"{not json")
        unprefixed = await http.get(upstream.origin + "/models")

    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert unprefixed.status_code == 200
    assert all(r.headers["x-request-id"].startswith("req_") for r in (missing, bad, unprefixed))


async def test_keep_alive_serves_many_requests_on_one_connection(upstream: MockOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(5):
            response = await http.post(upstream.base_url + "/chat/completions", json={"model": "m", "messages": MESSAGES})
            assert response.status_code == 200
        assert upstream.connections_open == 1


async def test_a_client_that_closes_mid_stream_is_counted_as_aborted(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    upstream.reply = " ".join(["word"] * 500)
    upstream.tokens_per_s = 100  # 5 s of stream: the client leaves long before the end

    def read_two_then_close() -> list[Any]:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        got = [next(stream), next(stream)]
        stream.close()
        return got

    got = await in_thread(read_two_then_close)
    with trio.fail_after(5):
        await upstream.aborted.wait()

    assert got[1].choices[0].delta.content == "word "
    await stream_counts(upstream, (1, 0, 1))


async def test_a_client_that_gives_up_on_a_hang_is_counted_as_aborted(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    upstream.hang = True

    with pytest.raises(openai.APITimeoutError):
        await in_thread(
            lambda: client.with_options(timeout=0.3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
    with trio.fail_after(5):
        await upstream.aborted.wait()

    assert upstream.streams_aborted == 1
    assert upstream.counts["/v1/chat/completions"] == 1


async def test_paced_events_arrive_separately(upstream: MockOpenAI) -> None:
    upstream.reply = "a b c d e"
    upstream.tokens_per_s = 50
    arrivals: list[float] = []
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http:
        async with http.stream("POST", upstream.base_url + "/chat/completions", json=body) as response:
            async for piece in response.aiter_bytes():
                arrivals += [trio.current_time()] * piece.count(b"data: ")

    assert len(arrivals) == 1 + 5 + 1 + 1  # role, words, finish, [DONE]
    # 5 tokens at 50/s: the words are spread over ~80 ms, not sent in one burst.
    assert arrivals[5] - arrivals[1] >= 0.06


async def test_a_client_that_times_out_before_the_first_byte_is_counted_as_aborted(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    upstream.first_byte_delay_s = 30

    def stream_with_short_timeout() -> None:
        client.with_options(timeout=0.3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)

    with pytest.raises(openai.APITimeoutError):
        await in_thread(stream_with_short_timeout)
    with trio.fail_after(5):
        await upstream.aborted.wait()

    await stream_counts(upstream, (1, 0, 1))


async def test_latency_delays_a_non_streaming_answer(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    upstream.latency_s = 0.1
    started = trio.current_time()

    completion = await in_thread(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))

    assert trio.current_time() - started >= 0.1
    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert upstream.streams_aborted == 0


# -- the Responses API ---------------------------------------------------------

# A Responses API function tool is flat: {type, name, parameters}, no "function" wrapper.
RESPONSES_WEATHER_TOOL = {"type": "function", **WEATHER_TOOL["function"]}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(reply_words(DEFAULT_REPLY)),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def parse_sse(content: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each `event: ...` / `data: ...` pair of a Responses stream."""
    events = content.split(b"\n\n")
    assert events[-1] == b""
    parsed = []
    for event in events[:-1]:
        name, data = event.split(b"\n")
        parsed.append((name.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: "))))
    return parsed


async def test_a_response_parses_with_the_sdk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    raw = await in_thread(lambda: client.responses.with_raw_response.create(model="gpt-4o-mini", input="hi"))
    response = raw.parse()

    assert response.output_text == DEFAULT_REPLY
    assert response.id.startswith("resp_")
    assert (response.object, response.status, response.model) == ("response", "completed", "gpt-4o-mini")
    assert response.error is None and response.incomplete_details is None
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert (message.role, message.status) == ("assistant", "completed")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert response.usage is not None
    assert response.usage.input_tokens == input_tokens_for("hi") == 1
    assert response.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert (response.parallel_tool_calls, response.tool_choice, response.tools) == (True, "auto", [])
    assert response.text is not None and response.text.format.type == "text"
    # Every field the SDK's model requires is there, with the right type (the SDK
    # itself does not validate).
    Response.model_validate(json.loads(raw.http_response.content))
    assert raw.headers["x-request-id"].startswith("req_")
    [recorded] = upstream.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/responses")
    assert recorded.json == {"model": "gpt-4o-mini", "input": "hi"}
    assert upstream.counts["/v1/responses"] == 1


async def test_input_items_and_instructions_count_as_input_and_parameters_are_echoed(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    items: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello to the gateway tests."}]},
        {"type": "message", "role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And again, with feeling."},
    ]
    instructions = "You are a helpful assistant."

    response = await in_thread(
        lambda: client.responses.create(
            model="gpt-4o",
            input=items,
            instructions=instructions,
            temperature=0.2,
            metadata={"k": "v"},
            store=False,
        )
    )

    assert response.output_text == DEFAULT_REPLY
    assert response.usage is not None
    assert response.usage.input_tokens == input_tokens_for(items, instructions)
    assert input_tokens_for(items, instructions) == (28 + 31 + 6 + 24) // 4
    assert (response.model, response.instructions, response.temperature) == ("gpt-4o", instructions, 0.2)
    assert response.metadata == {"k": "v"}
    assert upstream.requests[-1].json["store"] is False
    assert json.loads(upstream.requests[-1].body)["input"] == items


async def test_max_output_tokens_cuts_the_reply_and_makes_the_response_incomplete(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    response = await in_thread(
        lambda: client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=3)
    )

    assert response.output_text == "".join(reply_words(DEFAULT_REPLY)[:3])
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.max_output_tokens == 3


async def test_a_streamed_response_ends_with_the_completed_response_and_its_usage(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    def stream_all() -> tuple[list[Any], Any]:
        with client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
            events = list(stream)
            return events, stream.get_final_response()

    events, final = await in_thread(stream_all)

    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created = events[0].response
    assert (created.status, created.usage, created.output) == ("in_progress", None, [])
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == DEFAULT_REPLY
    assert deltas[-1].snapshot == DEFAULT_REPLY  # the SDK's accumulated text
    assert {(e.item_id, e.output_index, e.content_index) for e in deltas} == {(events[2].item.id, 0, 0)}
    assert all(e.logprobs == [] for e in deltas)
    completed = events[-1].response
    assert completed.id == created.id and completed.status == "completed"
    assert completed.usage is not None
    assert completed.usage.output_tokens == len(reply_words(DEFAULT_REPLY))
    assert completed.usage.input_tokens == input_tokens_for("hi")
    assert final.output_text == DEFAULT_REPLY
    assert upstream.requests[-1].json["stream"] is True
    await stream_counts(upstream, (1, 1, 0))


async def test_the_raw_responses_stream_is_openai_sse_without_done(upstream: MockOpenAI) -> None:
    upstream.reply = "one two"
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(upstream.base_url + "/responses", json=body)

    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    assert b"[DONE]" not in response.content
    events = parse_sse(response.content)
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for _, data in events:  # each one is a valid SDK event, required fields and all
        STREAM_EVENT.validate_python(data)
    by_type = {name: data for name, data in events}
    assert [data["delta"] for name, data in events if name == "response.output_text.delta"] == ["one ", "two"]
    assert by_type["response.output_item.added"]["item"]["content"] == []
    assert by_type["response.content_part.added"]["part"]["text"] == ""
    assert by_type["response.output_text.done"]["text"] == "one two"
    assert by_type["response.content_part.done"]["part"]["text"] == "one two"
    assert by_type["response.output_item.done"]["item"]["status"] == "completed"
    assert by_type["response.completed"]["response"]["output"] == [by_type["response.output_item.done"]["item"]]
    assert by_type["response.completed"]["response"]["usage"]["output_tokens"] == 2


async def test_a_streamed_response_cut_by_max_output_tokens_ends_incomplete(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    def stream_all() -> list[Any]:
        return list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True, max_output_tokens=2))

    events = await in_thread(stream_all)

    assert [e.type for e in events][-2:] == ["response.output_item.done", "response.incomplete"]
    assert len([e for e in events if e.type == "response.output_text.delta"]) == 2
    incomplete = events[-1].response
    assert incomplete.status == "incomplete"
    assert incomplete.incomplete_details is not None and incomplete.incomplete_details.reason == "max_output_tokens"
    assert incomplete.output_text == "".join(reply_words(DEFAULT_REPLY)[:2])
    assert incomplete.usage is not None and incomplete.usage.output_tokens == 2

    def final_of_the_stream_helper() -> Any:
        with client.responses.stream(model="gpt-4o-mini", input="hi", max_output_tokens=2) as stream:
            return stream.get_final_response()

    # The SDK's stream helper only finishes on response.completed (as with the real API).
    with pytest.raises(RuntimeError, match="response.completed"):
        await in_thread(final_of_the_stream_helper)


async def test_a_function_call_response_parses_with_the_sdk(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    response = await in_thread(
        lambda: client.responses.create(
            model="gpt-4o-mini", input=TOOL_MESSAGES[0]["content"], tools=[RESPONSES_WEATHER_TOOL]
        )
    )

    [call] = response.output
    assert call.type == "function_call"
    assert call.id is not None and call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    assert (call.name, call.status) == ("get_weather", "completed")
    assert json.loads(call.arguments) == {"city": "mock", "unit": "celsius"}
    assert response.output_text == ""
    assert response.status == "completed"
    assert response.tools[0].type == "function" and response.tools[0].name == "get_weather"


async def test_a_function_call_output_gets_a_text_answer(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    items: Any = [
        {"role": "user", "content": "What is the weather in Paris? Please call a tool."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]
    response = await in_thread(
        lambda: client.responses.create(model="gpt-4o-mini", input=items, tools=[RESPONSES_WEATHER_TOOL])
    )
    forced = await in_thread(
        lambda: client.responses.create(
            model="gpt-4o-mini", input="hi", tools=[RESPONSES_WEATHER_TOOL], tool_choice="required"
        )
    )
    plain = await in_thread(
        lambda: client.responses.create(model="gpt-4o-mini", input="hi", tools=[RESPONSES_WEATHER_TOOL])
    )

    assert response.output_text == DEFAULT_REPLY
    assert forced.output[0].type == "function_call"
    assert plain.output_text == DEFAULT_REPLY


async def test_a_streamed_function_call_reassembles(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    def stream_all() -> tuple[list[Any], Any]:
        with client.responses.stream(
            model="gpt-4o-mini", input="Please call a tool.", tools=[RESPONSES_WEATHER_TOOL]
        ) as stream:
            return list(stream), stream.get_final_response()

    events, final = await in_thread(stream_all)

    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and len(types) == 3 + len(deltas) + 3
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    assert json.loads("".join(e.delta for e in deltas)) == {"city": "mock", "unit": "celsius"}
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "mock", "unit": "celsius"}
    assert final.usage is not None and final.usage.output_tokens == len(deltas)


async def test_bad_responses_requests_get_openai_400s(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    bodies: list[dict[str, Any]] = [
        {"input": "hi"},
        {"model": "gpt-4o-mini"},
        {"model": 7, "input": "hi"},
        {"model": "gpt-4o-mini", "input": {"text": "hi"}},
        {"model": "gpt-4o-mini", "input": []},
        {"model": "gpt-4o-mini", "input": ["hi"]},
    ]
    async with httpx.AsyncClient() as http:
        answers = [await http.post(upstream.base_url + "/responses", json=body) for body in bodies]

    assert [a.status_code for a in answers] == [400] * len(bodies)
    errors = [a.json()["error"] for a in answers]
    assert all(set(e) == {"message", "type", "param", "code"} for e in errors)
    assert all(e["type"] == "invalid_request_error" for e in errors)
    assert [e["param"] for e in errors] == ["model", "input", "model", "input", "input", "input[0]"]
    assert errors[0]["code"] == "missing_required_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        await in_thread(lambda: client.responses.create(model="gpt-4o-mini", input=[]))
    assert caught.value.param == "input"
    assert upstream.counts["/v1/responses"] == len(bodies) + 1


async def test_a_forced_500_on_responses_raises_internal_server_error(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    upstream.status = 500

    with pytest.raises(openai.InternalServerError) as caught:
        await in_thread(lambda: client.responses.create(model="gpt-4o-mini", input="hi"))
    with pytest.raises(openai.InternalServerError):
        await in_thread(lambda: client.responses.create(model="gpt-4o-mini", input="hi", stream=True))

    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"
    assert upstream.counts["/v1/responses"] == 2
    assert upstream.streams_started == 0


async def test_responses_stream_events_are_paced_and_an_early_close_is_an_abort(
    upstream: MockOpenAI, client: openai.OpenAI
) -> None:
    upstream.reply = "a b c d e"
    upstream.tokens_per_s = 50
    arrivals: list[float] = []
    started = trio.current_time()
    async with httpx.AsyncClient() as http:
        body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
        async with http.stream("POST", upstream.base_url + "/responses", json=body) as response:
            async for piece in response.aiter_bytes():
                arrivals += [trio.current_time()] * piece.count(b"event: ")

    assert len(arrivals) == 4 + 5 + 4  # created ... content_part.added, the words, text done ... completed
    # 5 tokens at 50/s: the stream cannot end before ~80 ms (measured end to end: on a
    # loaded machine the reader may see paced events in bursts, never earlier).
    assert arrivals[-1] - started >= 0.08

    upstream.reply = " ".join(["word"] * 500)
    upstream.tokens_per_s = 100  # 5 s of stream: the client leaves long before the end

    def read_six_then_close() -> list[Any]:
        stream = client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
        got = [next(stream) for _ in range(6)]
        stream.close()
        return got

    got = await in_thread(read_six_then_close)
    with trio.fail_after(5):
        await upstream.aborted.wait()

    assert got[5].type == "response.output_text.delta" and got[5].delta == "word "
    await stream_counts(upstream, (2, 1, 1))


async def test_responses_latency_and_hang_apply(upstream: MockOpenAI, client: openai.OpenAI) -> None:
    upstream.latency_s = 0.1
    started = trio.current_time()
    response = await in_thread(lambda: client.responses.create(model="gpt-4o-mini", input="hi"))
    assert trio.current_time() - started >= 0.1
    assert response.output_text == DEFAULT_REPLY

    upstream.reset()
    upstream.hang = True
    with pytest.raises(openai.APITimeoutError):
        await in_thread(lambda: client.with_options(timeout=0.3).responses.create(model="gpt-4o-mini", input="hi"))
    with trio.fail_after(5):
        await upstream.aborted.wait()
    assert upstream.streams_aborted == 1
    assert upstream.counts["/v1/responses"] == 1
