"""The Google Gemini adapter, bytes in and bytes out, on recorded-style wire data.

Fixtures in tests/data/google/: ``request_*.json`` (an OpenAI request and the Gemini
request it must become), ``*.response.json`` / ``*.stream.sse`` (Gemini answers; the
streams with Google's CRLF line ends) and their ``*.expected.*`` OpenAI translations.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gwcore.config import Deployment
from gwcore.errors import InvalidRequest, UpstreamError, UpstreamStatus
from gwcore.providers import google
from gwcore.wire import Usage
from gwnative import SSEEvent, SSEParser

DATA = Path(__file__).resolve().parent.parent / "data" / "google"
CREATED = 1751328000
MODEL = "gemini-test"
REQUESTS = sorted(p.stem.removeprefix("request_") for p in DATA.glob("request_*.json"))
STREAMS = ["text", "function_call"]


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def dep(model: str = "gemini-2.0-flash") -> Deployment:
    return Deployment(provider="google", model=model)


def build(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return orjson.loads(google.build_chat(body, dep(), None, "k", **kw).body)


def user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def translate(raw: bytes, include_usage: bool = True, pieces: list[bytes] | None = None) -> bytes:
    parser = SSEParser()
    tr = google.StreamTranslator(MODEL, include_usage, CREATED)
    out = [f for piece in (pieces or [raw]) for e in parser.feed(piece) for f in tr.feed(e)]
    parser.close()
    return b"".join(out + tr.close())


def chunks_of(frames: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in SSEParser().feed(frames) if e.data != "[DONE]"]


# -- requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", REQUESTS)
def test_requests_translate_to_the_recorded_gemini_request(name: str) -> None:
    case = json.loads(read(f"request_{name}.json"))
    req = google.build_chat(case["openai"], dep(case["model"]), case["base_url"], "secret")

    assert req.method == "POST"
    assert req.url == case["expected"]["url"]
    assert req.stream is case["expected"]["stream"]
    assert req.headers == [("content-type", "application/json"), ("x-goog-api-key", "secret")]
    assert orjson.loads(req.body) == case["expected"]["body"]
    assert "stream" not in orjson.loads(req.body)


def test_the_default_base_url_model_prefixes_and_no_key() -> None:
    req = google.build_chat({"messages": user()}, dep("models/gemini-2.0-flash"), None, None)
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    assert req.headers == [("content-type", "application/json")]
    tuned = google.build_chat({"messages": user(), "stream": True}, dep("tunedModels/mine-1"), "http://h:1/", None)
    assert tuned.url == "http://h:1/v1beta/tunedModels/mine-1:streamGenerateContent?alt=sse"


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "f"}}, {"mode": "ANY", "allowedFunctionNames": ["f"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "f"}}]}}, {"mode": "VALIDATED", "allowedFunctionNames": ["f"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "f"}}]}}, {"mode": "ANY", "allowedFunctionNames": ["f"]}),
])
def test_tool_choice_becomes_a_function_calling_mode(choice: Any, config: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = build({"messages": user(), "tools": tools, "tool_choice": choice})
    assert body["tools"] == [{"functionDeclarations": [{"name": "f"}]}]
    assert body["toolConfig"] == {"functionCallingConfig": config}


def test_legacy_functions_and_function_messages_translate_like_tools() -> None:
    body = build({
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{\"a\": 1}"}},
            {"role": "function", "name": "f", "content": "[1, 2]"},
        ],
        "functions": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}],
        "function_call": {"name": "f"},
    })
    assert body["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"result": [1, 2]}}}]},
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}}


@pytest.mark.parametrize(("param", "value"), [
    ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50256": -100}),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low"),
    ("web_search_options", {}), ("verbosity", "low"), ("frobnicate", 1),
])
def test_parameters_that_would_change_the_answer_are_refused_by_name(param: str, value: Any) -> None:
    if param == "web_search_options":
        value = {"search_context_size": "low"}
    with pytest.raises(InvalidRequest) as info:
        build({"messages": user(), param: value})
    assert info.value.status == 400
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == param
    assert param in info.value.message


def test_parameters_asking_for_nothing_pass() -> None:
    body = build({"messages": user(), "logprobs": False, "top_logprobs": 0, "logit_bias": {},
                  "modalities": ["text"], "audio": None, "response_format": {"type": "text"}})
    assert body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
     "messages[0].content[0].file"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "tool", "tool_call_id": "nobody", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": user(), "tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"messages": user(), "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]},
     "tools[0].function.parameters.properties.a.not"),
    ({"messages": user(), "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}, "$defs": {"N": {
            "type": "object", "properties": {"child": {"$ref": "#/$defs/N"}}}}}}}]},
     "tools[0].function.parameters.properties.n.properties.child"),
    ({"messages": user(), "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"k": {"enum": [1, 2]}}}}}]},
     "tools[0].function.parameters.properties.k.enum"),
    ({"messages": user(), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"messages": user(), "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
     "response_format.json_schema.schema.uniqueItems"),
])
def test_requests_gemini_cannot_take_are_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build(body)
    assert info.value.status == 400
    assert info.value.param == param


# -- whole responses ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["text", "function_call", "thinking"])
def test_responses_translate_to_the_recorded_openai_completion(name: str) -> None:
    out, usage = google.parse_chat(read(f"{name}.response.json"), MODEL, CREATED)

    assert orjson.loads(out) == json.loads(read(f"{name}.expected.json"))
    ChatCompletion.model_validate_json(out)  # the openai SDK's own type accepts it
    assert usage is not None and usage.total_tokens == orjson.loads(out)["usage"]["total_tokens"]


def test_usage_counts_thoughts_as_completion_and_cached_as_prompt() -> None:
    _, usage = google.parse_chat(read("thinking.response.json"), MODEL, CREATED)
    # promptTokenCount 2057 of which 2048 cached; candidates 1 + thoughts 90.
    assert usage == Usage(prompt_tokens=2057, completion_tokens=91, cached_tokens=2048, reasoning_tokens=90)
    assert google.usage_from_metadata({"promptTokenCount": 5, "toolUsePromptTokenCount": 3}) == \
        Usage(prompt_tokens=8)
    assert google.usage_from_metadata(None) is None


def test_a_response_without_a_response_id_gets_a_stable_one() -> None:
    body = orjson.dumps({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f"}}]},
                                         "finishReason": "STOP"}]})
    first, usage = google.parse_chat(body, MODEL, CREATED)
    again, _ = google.parse_chat(body, MODEL, CREATED)
    assert first == again and usage is None
    completion = orjson.loads(first)
    assert completion["id"].startswith("chatcmpl-")
    message = completion["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize(("reason", "finish"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "stop"), ("MALFORMED_FUNCTION_CALL", "stop"),
])
def test_finish_reasons_map_to_openai(reason: str, finish: str) -> None:
    body = orjson.dumps({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason},
                                        {"content": {"parts": [{"text": "y"}]}, "finishReason": reason, "index": 1}]})
    completion = orjson.loads(google.parse_chat(body, MODEL, CREATED)[0])
    assert [(c["index"], c["finish_reason"]) for c in completion["choices"]] == [(0, finish), (1, finish)]


def test_a_blocked_prompt_is_a_content_filter_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        google.parse_chat(read("blocked.response.json"), MODEL, CREATED)
    assert (info.value.status, info.value.code) == (400, "content_filter")
    assert "PROHIBITED_CONTENT" in info.value.message
    tr = google.StreamTranslator(MODEL, True, CREATED)
    with pytest.raises(InvalidRequest):
        tr.feed(SSEEvent(data=read("blocked.response.json").decode()))


# -- streams -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", STREAMS)
def test_streams_translate_to_the_recorded_openai_chunks(name: str) -> None:
    out = translate(read(f"{name}.stream.sse"))

    assert out == read(f"{name}.stream.expected.sse")
    for chunk in chunks_of(out):
        ChatCompletionChunk.model_validate(chunk)
    assert out.endswith(b"data: [DONE]\n\n")


def test_without_include_usage_no_usage_chunk_and_no_usage_key() -> None:
    out = translate(read("text.stream.sse"), include_usage=False)
    chunks = chunks_of(out)
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert out.endswith(b"data: [DONE]\n\n")


def _assemble(frames: bytes) -> tuple[str, list[dict[str, Any]], str | None]:
    text, calls, finish = "", [], None
    for chunk in chunks_of(frames):
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                calls.append({k: v for k, v in call.items() if k != "index"})
            finish = choice["finish_reason"] or finish
    return text, calls, finish


@pytest.mark.parametrize("name", STREAMS)
def test_streamed_and_whole_answers_agree(name: str) -> None:
    whole, whole_usage = google.parse_chat(read(f"{name}.response.json"), MODEL, CREATED)
    tr = google.StreamTranslator(MODEL, True, CREATED)
    frames = b"".join(f for e in SSEParser().feed(read(f"{name}.stream.sse")) for f in tr.feed(e)) + \
        b"".join(tr.close())

    [choice] = orjson.loads(whole)["choices"]
    text, calls, finish = _assemble(frames)
    assert text == choice["message"]["content"]
    assert calls == choice["message"].get("tool_calls", [])
    assert finish == choice["finish_reason"]
    assert tr.usage == whole_usage
    assert chunks_of(frames)[0]["id"] == orjson.loads(whole)["id"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(STREAMS), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_a_stream_cut_anywhere_translates_to_the_same_bytes(name: str, cuts: list[int]) -> None:
    raw = read(f"{name}.stream.sse")
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    assert translate(raw, pieces=pieces) == read(f"{name}.stream.expected.sse")


@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_cut_short_is_detected_on_close(name: str) -> None:
    raw = read(f"{name}.stream.sse")
    parser = SSEParser()
    tr = google.StreamTranslator(MODEL, True, CREATED)
    for event in parser.feed(raw[:-3]):  # the last event never completes
        tr.feed(event)
    assert not tr.done
    with pytest.raises(UpstreamError, match="ended before it was complete"):
        tr.close()


def test_done_only_when_every_candidate_finished() -> None:
    tr = google.StreamTranslator(MODEL, False, CREATED)
    two = {"candidates": [{"content": {"parts": [{"text": "a"}]}}, {"content": {"parts": [{"text": "b"}]}, "index": 1}]}
    tr.feed(SSEEvent(data=orjson.dumps(two).decode()))
    tr.feed(SSEEvent(data='{"candidates": [{"content": {"parts": []}, "finishReason": "STOP", "index": 1}]}'))
    assert not tr.done
    out = tr.feed(SSEEvent(data='{"candidates": [{"content": {"parts": [{"text": "!"}]}, "finishReason": "STOP"}]}'))
    assert tr.done
    assert [c["choices"][0]["delta"] for c in chunks_of(b"".join(out))] == [{"content": "!"}, {}]
    assert tr.close() == [b"data: [DONE]\n\n"]
    assert tr.close() == []


def test_an_error_event_raises_the_mapped_error() -> None:
    tr = google.StreamTranslator(MODEL, True, CREATED)
    tr.feed(SSEEvent(data=read("text.stream.sse").split(b"\r\n\r\n")[0][6:].decode()))
    with pytest.raises(UpstreamError, match="overloaded"):
        tr.feed(SSEEvent(data='{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}'))


# -- errors ------------------------------------------------------------------------------

def test_a_429_keeps_its_status_and_turns_retry_info_into_retry_after() -> None:
    err = google.map_error(429, read("error_429.json"), [])
    assert isinstance(err, UpstreamStatus)
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert err.headers == [("retry-after", "23")]
    assert err.message.startswith("You exceeded your current quota")
    assert google.map_error(429, read("error_429.json"), [("Retry-After", "5")]).headers == [("Retry-After", "5")]


def test_a_bad_provider_key_is_the_gateways_problem() -> None:
    for status, body in [(400, read("error_api_key.json")), (401, b"{}"), (403, b'{"error": {"code": 403}}')]:
        err = google.map_error(status, body, [])
        assert type(err) is UpstreamError and err.status == 502
        assert "credentials" in err.message


@pytest.mark.parametrize(("status", "body", "code"), [
    (400, {"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}},
     "invalid_argument"),
    (404, {"error": {"code": 404, "message": "models/gemini-9 is not found for API version v1beta",
                     "status": "NOT_FOUND"}}, "not_found"),
    (400, [{"error": {"code": 400, "message": "The input token count (1200000) exceeds the maximum number of "
                                              "tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}],
     "context_length_exceeded"),
])
def test_client_errors_keep_status_and_message(status: int, body: Any, code: str) -> None:
    err = google.map_error(status, orjson.dumps(body), [])
    assert isinstance(err, UpstreamStatus)
    assert (err.status, err.type, err.code) == (status, "invalid_request_error", code)
    detail = body[0] if isinstance(body, list) else body
    assert err.message == detail["error"]["message"]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_a_502(status: int) -> None:
    err = google.map_error(status, b'{"error": {"code": 500, "message": "An internal error has occurred.", '
                                   b'"status": "INTERNAL"}}', [])
    assert type(err) is UpstreamError and err.status == 502
    assert str(status) in err.message and "internal error" in err.message
    assert "HTTP 503" in google.map_error(503, b"<html>busy</html>", []).message
