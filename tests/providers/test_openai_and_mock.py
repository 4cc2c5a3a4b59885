"""Sans-IO: the OpenAI passthrough adapter and the mock provider, bytes in, bytes out."""
from __future__ import annotations

import orjson

from gwcore.config import Deployment
from gwcore.errors import UpstreamError, UpstreamStatus
from gwcore.providers import mock, openai

DEP = Deployment(provider="openai", model="gpt-4o-mini-2024-07-18")
BODY = {"model": "chat-default", "messages": [{"role": "user", "content": "hi there"}]}


def test_chat_request_rewrites_the_model_and_asks_for_stream_usage():
    req = openai.build_chat({**BODY, "stream": True}, DEP, "http://up/v1", "sk-1")
    assert req.url == "http://up/v1/chat/completions"
    sent = orjson.loads(req.body)
    assert sent["model"] == "gpt-4o-mini-2024-07-18"
    assert sent["stream_options"] == {"include_usage": True} and req.injected_usage
    assert ("authorization", "Bearer sk-1") in req.headers
    asked = openai.build_chat({**BODY, "stream": True, "stream_options": {"include_usage": True}},
                              DEP, "http://up/v1", None)
    assert not asked.injected_usage
    plain = openai.build_chat(BODY, DEP, "http://up/v1/", None)
    assert "stream_options" not in orjson.loads(plain.body) and not plain.stream


def test_join_url_keeps_a_query_at_the_end():
    assert openai.join_url("mock://demo?tokens_per_s=5", "/models") == "mock://demo/models?tokens_per_s=5"
    assert openai.join_url("http://h/v1/", "/embeddings") == "http://h/v1/embeddings"


def test_upstream_errors_map_to_what_the_client_should_see():
    body = orjson.dumps({"error": {"message": "bad param", "type": "invalid_request_error",
                                   "param": "temperature", "code": "invalid_value"}})
    e = openai.map_error(400, body, [])
    assert isinstance(e, UpstreamStatus) and e.status == 400 and e.param == "temperature"
    e = openai.map_error(429, b"{}", [("retry-after", "2")])
    assert e.status == 429 and e.headers == [("retry-after", "2")]
    e = openai.map_error(401, body, [])
    assert isinstance(e, UpstreamError) and e.status == 502  # not the caller's key
    e = openai.map_error(503, b"<html>oops</html>", [])
    assert e.status == 502 and "503" in e.message


def test_mock_is_deterministic_and_streams_the_same_text():
    whole = orjson.loads(mock.chat_completion(BODY, "m", 1))
    again = orjson.loads(mock.chat_completion(BODY, "m", 1))
    assert whole == again
    text = whole["choices"][0]["message"]["content"]
    events = mock.chat_stream({**BODY, "stream_options": {"include_usage": True}}, "m", 1)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-1]["usage"] == whole["usage"]
    short = orjson.loads(mock.chat_completion({**BODY, "max_tokens": 2}, "m", 1))
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 2


def test_mock_embeddings_honour_base64():
    import base64
    import struct
    flt = orjson.loads(mock.embeddings({"input": "x"}, "e"))["data"][0]["embedding"]
    b64 = orjson.loads(mock.embeddings({"input": ["x"], "encoding_format": "base64"}, "e"))
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(flt)}f", raw)) == [struct.unpack("<f", struct.pack("<f", v))[0] for v in flt]
