"""Sans-IO: the Anthropic adapter and the /v1/messages ingress, bytes in, bytes out.

Golden files live in tests/data/anthropic/: Anthropic's wire data as the API sends it
(``*.json`` messages, ``*.sse`` streams) next to the exact OpenAI output expected from
it (``*.openai.*``), and the ingress direction's ``ingress_request.json`` /
``openai_stream.sse`` with their translations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic.types
import openai.types.chat
import orjson
import pydantic
import pytest
from anthropic._streaming import SSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given, settings
from hypothesis import strategies as st

from gwcore.config import Deployment
from gwcore.errors import (InvalidRequest, UpstreamError, UpstreamStatus,
                           UpstreamUnavailable)
from gwcore.providers import anthropic as adapter
from gwcore.wire import Usage
from gwnative import SSEParser
from tests.support.mock_anthropic import TOOL_PREAMBLE, _Message

DATA = Path(__file__).resolve().parent.parent / "data" / "anthropic"
DEP = Deployment(provider="anthropic", model="claude-sonnet-4-5-20250929")
CREATED = 1700000000
USER = [{"role": "user", "content": "hi there"}]

_chunk = pydantic.TypeAdapter(openai.types.chat.ChatCompletionChunk)
_completion = pydantic.TypeAdapter(openai.types.chat.ChatCompletion)
_raw_event = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
_message = pydantic.TypeAdapter(anthropic.types.Message)


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def sent(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return orjson.loads(adapter.build_chat(body, DEP, kw.get("base"), "sk-ant").body)


def translate(stream: bytes, include_usage: bool = True, pieces: list[bytes] | None = None,
              ) -> tuple[bytes, adapter.StreamTranslator]:
    translator = adapter.StreamTranslator("chat-default", include_usage, CREATED)
    parser = SSEParser()
    out = b"".join(frame for piece in (pieces or [stream]) for event in parser.feed(piece)
                   for frame in translator.feed(event))
    parser.close()
    return out, translator


def chunks_of(frames: bytes) -> list[dict[str, Any]]:
    events = SSEParser().feed(frames)
    assert events[-1].data == "[DONE]"
    return [orjson.loads(e.data) for e in events[:-1]]


def assembled(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(text, tool calls, finish_reason) of a chunk stream, as an OpenAI client assembles it."""
    text, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] = (call.get("function") or {}).get("name") or slot["name"]
                slot["arguments"] += (call.get("function") or {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return text, [calls[i] for i in sorted(calls)], finish


# -- requests ---------------------------------------------------------------------------

def test_a_chat_request_becomes_the_recorded_messages_request():
    req = adapter.build_chat(orjson.loads(data("chat_request.json")), DEP, None, "sk-ant-test")

    assert (req.method, req.url, req.stream) == ("POST", "https://api.anthropic.com/v1/messages", True)
    assert ("x-api-key", "sk-ant-test") in req.headers
    assert ("anthropic-version", "2023-06-01") in req.headers
    assert ("content-type", "application/json") in req.headers
    assert orjson.loads(req.body) == orjson.loads(data("chat_request.anthropic.json"))


def test_the_base_url_has_no_v1_and_keeps_a_query():
    req = adapter.build_chat({"messages": USER}, DEP, "http://127.0.0.1:9/?beta=1", None)
    assert req.url == "http://127.0.0.1:9/v1/messages?beta=1"
    assert not any(k == "x-api-key" for k, _ in req.headers)


def test_a_plain_request_stays_plain_and_gets_the_default_max_tokens():
    body = sent({"model": "x", "messages": [{"role": "system", "content": "Be brief."}, *USER]})
    assert body == {"model": DEP.model, "max_tokens": 4096, "system": "Be brief.",
                    "messages": [{"role": "user", "content": "hi there"}]}
    assert sent({"messages": USER, "max_tokens": 7})["max_tokens"] == 7
    assert sent({"messages": USER, "max_tokens": 7, "max_completion_tokens": 9})["max_tokens"] == 9


def test_consecutive_turns_merge_and_tool_results_join_the_next_user_turn():
    body = sent({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"}]})
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r1"},
                                     {"type": "text", "text": "c"}]},
        {"role": "assistant", "content": "d"}]


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", False, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "f"}}, True, {"type": "tool", "name": "f"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_tool_choice_maps_to_anthropic(choice, parallel, expected):
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = sent({"messages": USER, "tools": tools, "tool_choice": choice,
                 "parallel_tool_calls": parallel})
    assert body["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    assert body.get("tool_choice") == expected


def test_stop_user_and_sampling_are_mapped():
    body = sent({"messages": USER, "stop": ["x", "y"], "user": "u1", "temperature": 1,
                 "top_p": 0.5, "stream": False})
    assert body["stop_sequences"] == ["x", "y"]
    assert body["metadata"] == {"user_id": "u1"}
    assert (body["temperature"], body["top_p"]) == (1, 0.5)
    assert "stream" not in body


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"seed": 42}, "seed"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ({"temperature": 1.5}, "temperature"),
    ({"made_up_field": 1}, "made_up_field"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
])
def test_what_cannot_be_translated_is_a_400_naming_the_field(extra, param):
    with pytest.raises(InvalidRequest) as caught:
        adapter.build_chat({"model": "m", "messages": USER, **extra}, DEP, None, None)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == "unsupported_parameter"
    assert param.split("[")[0] in caught.value.message


@pytest.mark.parametrize("extra", [
    {"n": 1}, {"logprobs": False}, {"presence_penalty": 0}, {"frequency_penalty": 0.0},
    {"seed": None}, {"logit_bias": {}}, {"modalities": ["text"]}, {"response_format": {"type": "text"}},
    {"stream_options": {"include_usage": True}}, {"store": True}, {"metadata": {"a": "b"}},
    {"service_tier": "auto"}, {"prompt_cache_key": "k"},
])
def test_neutral_values_and_harmless_fields_are_accepted(extra):
    assert sent({"messages": USER, **extra})["messages"] == USER


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "system", "content": "only a system prompt"}], "messages"),
    ([{"role": "assistant", "content": "I start"}, *USER], "messages"),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([*USER, {"role": "assistant", "content": ""}], "messages[1].content"),
    ([], "messages"),
])
def test_messages_anthropic_cannot_take_are_a_400(messages, param):
    with pytest.raises(InvalidRequest) as caught:
        adapter.build_chat({"messages": messages}, DEP, None, None)
    assert caught.value.param == param


# -- answers ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["message_text", "message_tool_use"])
def test_a_message_becomes_the_recorded_chat_completion(name):
    body, usage = adapter.parse_chat(data(f"{name}.json"), "chat-default", CREATED)

    assert body + b"\n" == data(f"{name}.openai.json")
    _completion.validate_json(body)
    assert usage is not None


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens():
    _, text_usage = adapter.parse_chat(data("message_text.json"), "m", CREATED)
    _, tool_usage = adapter.parse_chat(data("message_tool_use.json"), "m", CREATED)

    assert text_usage == Usage(prompt_tokens=472 + 2048, completion_tokens=12,
                               cached_tokens=2048, reasoning_tokens=0, cache_write_tokens=0)
    assert tool_usage == Usage(prompt_tokens=310 + 1024, completion_tokens=131,
                               cached_tokens=0, reasoning_tokens=18, cache_write_tokens=1024)


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"),
    ("max_tokens", "length"), ("model_context_window_exceeded", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"),
])
def test_stop_reasons_map_to_finish_reasons(stop_reason, finish):
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
               "content": [], "stop_reason": stop_reason, "stop_sequence": None,
               "usage": {"input_tokens": 1, "output_tokens": 0}}
    body, _ = adapter.parse_chat(orjson.dumps(message), "m", CREATED)
    choice = orjson.loads(body)["choices"][0]
    assert choice["finish_reason"] == finish
    assert choice["message"]["content"] == ""


def test_a_message_that_is_not_json_is_an_upstream_error():
    with pytest.raises(UpstreamError):
        adapter.parse_chat(b"<html>", "m", CREATED)


@pytest.mark.parametrize("name", ["stream_text", "stream_tool_use"])
def test_a_stream_becomes_the_recorded_chunks(name):
    out, translator = translate(data(f"{name}.sse"))

    assert out == data(f"{name}.openai.sse")
    assert translator.done
    for chunk in chunks_of(out):
        _chunk.validate_python(chunk)


def test_without_include_usage_there_is_no_usage_anywhere_but_it_is_still_counted():
    out, translator = translate(data("stream_text.sse"), include_usage=False)
    chunks = chunks_of(out)
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert translator.usage is not None and translator.usage.cached_tokens == 2048


@pytest.mark.parametrize("name", ["text", "tool_use"])
def test_streamed_and_whole_answers_agree(name):
    whole, usage = adapter.parse_chat(data(f"message_{name}.json"), "chat-default", CREATED)
    out, translator = translate(data(f"stream_{name}.sse"))
    assert_same_answer(orjson.loads(whole), chunks_of(out))
    assert translator.usage == usage


def assert_same_answer(whole: dict[str, Any], chunks: list[dict[str, Any]]) -> None:
    text, calls, finish = assembled(chunks)
    message = whole["choices"][0]["message"]
    assert text == (message["content"] or "")
    assert finish == whole["choices"][0]["finish_reason"]
    expected = message.get("tool_calls") or []
    assert [(c["id"], c["name"]) for c in calls] == \
        [(c["id"], c["function"]["name"]) for c in expected]
    assert [orjson.loads(c["arguments"]) for c in calls] == \
        [orjson.loads(c["function"]["arguments"]) for c in expected]
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("tool", [False, True])
def test_the_mock_upstreams_streamed_and_whole_answers_agree(tool):
    plan = _Message(id="msg_mock", created=0, model="m", n=1, prompt_tokens=9, words=("Hi ", "there"),
                    finish_reason="end_turn", cache_read=4)
    if tool:
        plan.tool_name, plan.tool_id, plan.tool_input = "f", "toolu_1", {"city": "Paris, France"}
        plan.preamble, plan.finish_reason = (TOOL_PREAMBLE,), "tool_use"
    whole, usage = adapter.parse_chat(plan.completion(), "m", CREATED)
    out, translator = translate(b"".join(event for _, event in plan.events()))
    assert_same_answer(orjson.loads(whole), chunks_of(out))
    assert translator.usage == usage == Usage(prompt_tokens=13, completion_tokens=plan.output_tokens,
                                             cached_tokens=4)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["stream_text.sse", "stream_tool_use.sse"]),
       cuts=st.lists(st.integers(0, 6000), max_size=40))
def test_a_stream_cut_anywhere_translates_to_the_same_bytes(name, cuts):
    stream = data(name)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    out, translator = translate(stream, pieces=pieces)
    assert out == data(name.replace(".sse", ".openai.sse"))
    assert translator.done


def test_an_error_event_raises_the_mapped_error_after_the_partial_answer():
    translator = adapter.StreamTranslator("m", True, CREATED)
    events = SSEParser().feed(data("stream_error.sse"))
    frames = [f for e in events[:-1] for f in translator.feed(e)]
    assert assembled([orjson.loads(f[6:]) for f in frames])[0] == "Once upon"

    with pytest.raises(UpstreamUnavailable) as caught:
        translator.feed(events[-1])
    assert (caught.value.status, caught.value.code) == (503, "upstream_unavailable")
    assert "Overloaded" in caught.value.message
    assert not translator.done


def test_a_stream_cut_before_message_stop_is_not_done_and_has_no_finish():
    stream = data("stream_text.sse")
    out, translator = translate(stream[: stream.index(b"event: message_stop")])
    assert not translator.done
    assert b"[DONE]" not in out and b'"finish_reason":"stop"' not in out


def test_a_tool_call_without_streamed_arguments_gets_an_empty_object():
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)
    _, calls, finish = assembled(chunks_of(translate(stream)[0]))
    assert calls == [{"id": "toolu_1", "name": "now", "arguments": "{}"}]
    assert finish == "tool_calls"


@pytest.mark.parametrize(("status", "kind", "expected", "code"), [
    (400, "invalid_request_error", 400, "invalid_request"),
    (404, "not_found_error", 404, "not_found"),
    (413, "request_too_large", 413, "request_too_large"),
    (429, "rate_limit_error", 429, "rate_limit_exceeded"),
    (401, "authentication_error", 502, "upstream_error"),
    (403, "permission_error", 502, "upstream_error"),
    (500, "api_error", 502, "upstream_error"),
    (529, "overloaded_error", 503, "upstream_unavailable"),
])
def test_upstream_errors_map_like_the_openai_adapters(status, kind, expected, code):
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "the message"},
                         "request_id": "req_1"})
    error = adapter.map_error(status, body, [("Retry-After", "3")])
    assert (error.status, error.code) == (expected, code)
    if status in (400, 404, 413, 429):
        assert isinstance(error, UpstreamStatus) and error.message == "the message"
        assert error.type == ("rate_limit_error" if status == 429 else "invalid_request_error")
    if status in (429, 529):
        assert error.headers == [("Retry-After", "3")]
    assert adapter.map_error(502, b"<html>bad gateway</html>", []).message.endswith("bad gateway</html>")


# -- ingress ----------------------------------------------------------------------------

def test_an_anthropic_request_becomes_the_recorded_chat_request():
    body = adapter.ingress_to_openai(orjson.loads(data("ingress_request.json")))
    assert body == orjson.loads(data("ingress_request.openai.json"))
    assert body["stream_options"] == {"include_usage": True}


def test_the_ingress_round_trip_gives_back_the_anthropic_request():
    original = orjson.loads(data("ingress_request.json"))
    back = orjson.loads(adapter.build_chat(adapter.ingress_to_openai(original), DEP, None, None).body)

    for block in original["system"]:
        block.pop("cache_control", None)  # a caching hint: dropped on the way (documented)
    original["messages"][2]["content"][1].pop("is_error")
    assert back.pop("model") == DEP.model
    assert back == {k: v for k, v in original.items() if k != "model"}


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"max_tokens": 1, "messages": USER}, "model", "model: Field required"),
    ({"model": "m", "messages": USER}, "max_tokens", "max_tokens: Field required"),
    ({"model": "m", "max_tokens": 1}, "messages", "messages: Field required"),
    ({"model": "m", "max_tokens": "many", "messages": USER}, "max_tokens", "max_tokens: "),
])
def test_ingress_validates_required_fields_like_anthropic(body, param, message):
    with pytest.raises(InvalidRequest) as caught:
        adapter.ingress_to_openai(body)
    assert caught.value.param == param and caught.value.message.startswith(message)
    assert orjson.loads(caught.value.anthropic_body())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("extra", "param"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"top_k": 5}, "top_k"),
    ({"output_config": {"effort": "low"}}, "output_config"),
    ({"mcp_servers": []}, "mcp_servers"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x", "media_type": "text/plain"}}]}]},
     "messages.0.content.0.type"),
])
def test_ingress_refuses_what_openai_cannot_do(extra, param):
    with pytest.raises(InvalidRequest) as caught:
        adapter.ingress_to_openai({"model": "m", "max_tokens": 10, "messages": USER, **extra})
    assert caught.value.param == param and caught.value.code == "unsupported_parameter"


def test_ingress_takes_system_messages_and_drops_harmless_fields():
    body = adapter.ingress_to_openai({
        "model": "m", "max_tokens": 10, "thinking": {"type": "disabled"}, "service_tier": "auto",
        "messages": [{"role": "system", "content": "Be terse."}, *USER]})
    assert body == {"model": "m", "max_completion_tokens": 10,
                    "messages": [{"role": "system", "content": "Be terse."}, *USER]}


@pytest.mark.parametrize("name", ["message_text", "message_tool_use"])
def test_a_hub_answer_becomes_an_anthropic_message_with_the_upstream_id(name):
    hub, _ = adapter.parse_chat(data(f"{name}.json"), "chat-default", CREATED)
    message = orjson.loads(adapter.openai_to_ingress(hub, "chat-default"))
    original = orjson.loads(data(f"{name}.json"))

    _message.validate_python(message)
    assert message["id"] == original["id"]
    assert message["stop_reason"] == original["stop_reason"]
    text = "".join(b["text"] for b in original["content"] if b["type"] == "text")
    assert message["content"] == [{"type": "text", "text": text}, *[
        b for b in original["content"] if b["type"] == "tool_use"]]
    u = original["usage"]
    assert message["usage"]["input_tokens"] + message["usage"]["cache_read_input_tokens"] == \
        u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
    assert message["usage"]["output_tokens"] == u["output_tokens"]


def test_an_openai_completion_becomes_an_anthropic_message():
    completion = {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "gpt",
                  "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                               "message": {"role": "assistant", "content": "Hi", "refusal": None}}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                            "prompt_tokens_details": {"cached_tokens": 4}}}
    message = orjson.loads(adapter.openai_to_ingress(orjson.dumps(completion), "claude-x"))
    assert message == {"id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-x",
                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "max_tokens",
                       "stop_sequence": None,
                       "usage": {"input_tokens": 6, "output_tokens": 2,
                                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}}
    completion["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]
    with pytest.raises(UpstreamError):
        adapter.openai_to_ingress(orjson.dumps(completion), "claude-x")


def ingress_frames(stream: bytes) -> tuple[bytes, adapter.IngressStreamTranslator]:
    translator = adapter.IngressStreamTranslator("chat-default")
    out = b"".join(f for e in SSEParser().feed(stream) for f in translator.feed(e.data))
    return out, translator


def sdk_message(frames: bytes) -> anthropic.types.Message:
    """The frames read as the anthropic SDK reads a stream: its SSE decoder, its event
    types, its accumulator (what ``client.messages.stream(...)`` does)."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for sse in SSEDecoder().iter_bytes(iter([frames])):
        assert sse.event == orjson.loads(sse.data)["type"]
        event = _raw_event.validate_json(sse.data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return snapshot


def test_an_openai_stream_becomes_the_recorded_anthropic_stream():
    out, translator = ingress_frames(data("openai_stream.sse"))
    assert out == data("openai_stream.anthropic.sse")
    assert translator.done
    assert translator.usage == Usage(prompt_tokens=1200, completion_tokens=41, cached_tokens=1024)

    message = sdk_message(out)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Checking both."
    assert [b.input for b in message.content[1:]] == [{"location": "Paris"}, {"location": "London"}]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.output_tokens) == (176, 1024, 41)


@pytest.mark.parametrize("name", ["text", "tool_use"])
def test_a_round_trip_through_the_hub_streams_what_the_whole_answer_says(name):
    hub_stream, _ = translate(data(f"stream_{name}.sse"))
    frames, translator = ingress_frames(hub_stream)
    hub_whole, usage = adapter.parse_chat(data(f"message_{name}.json"), "chat-default", CREATED)
    whole = orjson.loads(adapter.openai_to_ingress(hub_whole, "chat-default"))

    streamed = sdk_message(frames).to_dict(exclude_none=True)
    assert streamed == _message.validate_python(whole).to_dict(exclude_none=True)
    assert translator.usage == Usage(prompt_tokens=usage.prompt_tokens,
                                     completion_tokens=usage.completion_tokens,
                                     cached_tokens=usage.cached_tokens,
                                     reasoning_tokens=usage.reasoning_tokens)


def test_an_empty_openai_stream_still_makes_a_complete_anthropic_stream():
    frames, translator = ingress_frames(b"data: [DONE]\n\n")
    message = sdk_message(frames)
    assert (message.content, message.stop_reason, translator.done) == ([], "end_turn", True)
