"""Fuzzing the HTTP server over real sockets: generated, mutated and random requests.

Every example opens a connection to a gateway running in demo mode (the mock provider
answers every model; the response cache is on so its key is computed too), sends its
bytes, half-closes and reads until the server closes, every read under a timeout (no
hang).  What came back must be a sequence of well-formed HTTP/1.1 responses with a
status below 500 (or 501/505, the protocol's own "not supported"), in the order of the
requests, error bodies in the format of the API that was called; and after every
example a normal client is still served.  Errors logged by the gateway (a handler that
raised) fail the example even when the client saw nothing of them.
"""
from __future__ import annotations

import hashlib
import logging
import string
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import ThreadedGateway, threaded_gateway
from tests.hardening.wire import (PROTOCOL_5XX, Parsed, Response, assert_error_format,
                                  healthz_ok, parse_responses, request, send_and_read)

KEY = "sk-gw-fuzz-0123456789"
MASTER = "sk-gw-master-0123456789"

API = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
       "/chat/completions", "/embeddings", "/responses", "/messages"]
PATHS = API + ["/v1/models", "/models", "/healthz", "/readyz", "/metrics", "/admin/keys",
               "/admin/keys/abc", "/admin/usage?since=x&until=y", "/", "/nope", "/v1/",
               "/v1/chat/completions/", "//v1/models", "/v1/models?x=1&y", "*",
               "http://gw/healthz", "/v1/chat/completions?stream=true", "/%00", "/%zz"]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
           "TRACE", "CONNECT", "FOO"]
MODELS = ["mock-1", "gpt-4o-mini", "claude-3-5-haiku-latest", "gemini-2.0-flash",
          "text-embedding-3-small", "", "no/such:model", "x" * 300, "\u00e9\u6f22\U0001f600"]

# A header value h11 accepts: visible ASCII and obs-text, inner spaces and tabs.
_VCHAR = "".join(chr(c) for c in range(0x21, 0x7F)) + "\u00a0\u00ff"
header_values = st.text(alphabet=_VCHAR + " \t", max_size=40).map(str.strip)
header_names = st.text(alphabet=string.ascii_letters + string.digits + "-!#$%&'*+.^_`|~",
                       min_size=1, max_size=20)
# Framing, connection management and the per-request timeout hints are set by the
# tests themselves (a timeout hint of 1e-9 s is a legitimate 504).
_RESERVED = {"content-length", "transfer-encoding", "connection", "host", "x-request-id",
             "x-gateway-timeout", "x-stainless-timeout", "upgrade", "expect", "te",
             "keep-alive", "trailer", "proxy-connection"}
extra_headers = st.lists(
    st.tuples(st.one_of(header_names, st.sampled_from(
        ["authorization", "x-api-key", "cache-control", "content-type", "accept",
         "anthropic-version", "openai-organization", "user-agent"])), header_values)
    .filter(lambda kv: kv[0].lower() not in _RESERVED),
    max_size=4)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["user", "assistant", "system", "tool", "text", "image_url", "auto",
                     "none", "required", "function", "mock-1", "data:image/png;base64,AA=="]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "temperature",
          "tools", "tool_choice", "input", "system", "n", "stop", "user", "metadata",
          "response_format", "max_completion_tokens", "top_p", "encoding_format"]


@st.composite
def messages(draw: st.DrawFn) -> list[Any]:
    roles = st.sampled_from(["user", "assistant", "system", "developer", "tool", "bot"])
    content = st.one_of(st.text(max_size=30), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "image", "tool_result", "x"]),
         "text": st.text(max_size=10)}), max_size=2), json_values)
    return draw(st.lists(st.fixed_dictionaries({"role": roles, "content": content}),
                         min_size=1, max_size=3))


@st.composite
def api_bodies(draw: st.DrawFn, path: str) -> bytes:
    """A body for ``path``: of the right shape (more or less), or any JSON, or bytes."""
    kind = draw(st.sampled_from(["shaped", "shaped", "json", "bytes", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if kind == "json":
        return orjson.dumps(draw(json_values))
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS))}
    if "messages" in path:
        body["max_tokens"] = draw(st.one_of(st.integers(-1, 50), json_values))
    if "embeddings" in path or "responses" in path:
        body["input"] = draw(st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8),
                                                                         max_size=3), json_values))
    else:
        body["messages"] = draw(messages())
    body.update(draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3)))
    if draw(st.booleans()):
        body["stream"] = draw(st.one_of(st.booleans(), json_values))
    return orjson.dumps(body)


@st.composite
def requests(draw: st.DrawFn, keys: list[str] = ()) -> tuple[str, str, bytes | None, list]:
    path = draw(st.one_of(st.sampled_from(PATHS), st.text(
        alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/?%",
        max_size=30).map(lambda t: "/" + t)))
    method = draw(st.sampled_from(METHODS))
    body = draw(api_bodies(path)) if method in ("POST", "PUT", "PATCH") else None
    headers = draw(extra_headers)
    if keys and draw(st.booleans()):
        headers.append(("authorization", f"Bearer {draw(st.sampled_from(keys))}"))
    return method, path, body, headers


def rid(i: int) -> str:
    """Request i's x-request-id; a check digit, so an id mangled by a mutation is no
    other request's id."""
    return f"fz-{i}-{hashlib.sha256(str(i).encode()).hexdigest()[:8]}"


def encode(reqs: list[tuple[str, str, bytes | None, list]], chunked: list[bool], *,
           close: bool = False) -> bytes:
    """The requests, pipelined, each with its id; with ``close`` the last one asks the
    server to close after its answer (how the tests know the server is done without a
    half-close, which a stream as the last answer may take for the client leaving)."""
    return b"".join(
        request(m, p, b, chunked=c, headers=h + [("x-request-id", rid(i))]
                + ([("connection", "close")] if close and i == len(reqs) - 1 else []))
        for i, ((m, p, b, h), c) in enumerate(zip(reqs, chunked)))


# -- fixtures ---------------------------------------------------------------------------

class ErrorRecords(logging.Handler):
    """ERROR records of the gateway's loggers (a handler that raised logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.getMessage()}\n{r.exc_text or ''}" for r in self.records]
        self.records.clear()
        return out


@pytest.fixture(scope="module")
def logged_errors() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    handler.setFormatter(logging.Formatter())
    logger = logging.getLogger("gwcore")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _gateway_options() -> dict[str, Any]:
    return {"server.header_timeout_s": 0.5, "server.body_timeout_s": 0.5,
            "server.keepalive_timeout_s": 2.0, "server.max_header_bytes": 8192,
            "server.max_body_bytes": 64 * 1024, "server.shutdown_grace_s": 1.0,
            "cache.enabled": True,
            "limits.default.requests": 10**9}


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    with threaded_gateway(tmp_path_factory.mktemp("gw"), demo=True, **_gateway_options()) as gw:
        yield gw


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    """With a client key and the master key: auth and the admin API are in play."""
    with threaded_gateway(tmp_path_factory.mktemp("gw"), demo=True,
                          env={"GATEWAY_API_KEYS": KEY, "GATEWAY_MASTER_KEY": MASTER},
                          **_gateway_options()) as gw:
        yield gw


def check_answers(parsed: Parsed, reqs: list[tuple[str, str, Any, Any]]) -> None:
    """Every answer well-formed (parse_responses raised otherwise), no 5xx but the
    protocol's own, error bodies in the called API's format (HEAD answers have none)."""
    for i, resp in enumerate(parsed.responses):
        assert resp.status < 500 or resp.status in PROTOCOL_5XX, (resp.status, resp.body[:500])
        method, path = reqs[i][:2] if i < len(reqs) else (None, None)
        if method == "HEAD":
            assert resp.body == b""
            continue
        if resp.status >= 400 and path is not None:
            assert_error_format(resp, path.partition("?")[0])
        if resp.header(b"content-type") == b"text/event-stream; charset=utf-8":
            assert_stream_is_complete(resp, path or "")


def assert_stream_is_complete(resp: Response, path: str) -> None:
    """A 200 stream ends with its end marker, or with an error event: no truncation."""
    text = resp.body.decode()
    if path.endswith("/messages"):
        assert "event: message_stop" in text or "event: error" in text, text[-300:]
    else:
        assert text.endswith("data: [DONE]\n\n") or '"error"' in text.rsplit("data: ", 1)[-1], \
            text[-300:]


def no_errors_logged(errors: ErrorRecords) -> None:
    logged = errors.take()
    assert not logged, "the gateway logged errors:\n" + "\n".join(logged)


# -- generated requests -----------------------------------------------------------------

@settings(max_examples=150)
@given(reqs=st.lists(requests(), min_size=1, max_size=3), data=st.data())
def test_generated_requests_get_well_formed_answers_in_order(
        fuzz_gateway, logged_errors, reqs, data) -> None:
    chunked = data.draw(st.lists(st.booleans(), min_size=len(reqs), max_size=len(reqs)))
    raw = encode(reqs, chunked, close=True)
    got = send_and_read(fuzz_gateway.port, raw, half_close=False)
    assert got.closed, "no close within the timeout after 'connection: close'"
    parsed = parse_responses(got.data, got.closed, [m for m, *_ in reqs])
    assert parsed.complete
    # One answer per request, in order, each naming its own request: no mixing.
    assert [r.header(b"x-request-id") for r in parsed.responses] == \
        [rid(i).encode() for i in range(len(reqs))], [r.status for r in parsed.responses]
    check_answers(parsed, reqs)
    no_errors_logged(logged_errors)
    assert healthz_ok(fuzz_gateway.port)


@settings(max_examples=100)
@given(reqs=st.lists(requests(keys=[KEY, MASTER, "sk-wrong-key-123456", ""]),
                     min_size=1, max_size=2))
def test_generated_requests_with_keys_and_the_admin_api(keyed_gateway, logged_errors,
                                                         reqs) -> None:
    raw = encode(reqs, [False] * len(reqs), close=True)
    got = send_and_read(keyed_gateway.port, raw, half_close=False)
    assert got.closed
    parsed = parse_responses(got.data, got.closed, [m for m, *_ in reqs])
    assert [r.header(b"x-request-id") for r in parsed.responses] == \
        [rid(i).encode() for i in range(len(reqs))]
    check_answers(parsed, reqs)
    no_errors_logged(logged_errors)
    assert healthz_ok(keyed_gateway.port)


@settings(max_examples=60)
@given(req=requests(), data=st.data())
def test_a_request_split_anywhere_gets_the_same_answer(fuzz_gateway, logged_errors,
                                                       req, data) -> None:
    raw = encode([req], [data.draw(st.booleans())], close=True)
    whole = parse_responses(*_sent(fuzz_gateway, [raw]), [req[0]])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=6))))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)]) if raw[a:b]]
    split = parse_responses(*_sent(fuzz_gateway, pieces, pause_s=0.001), [req[0]])
    assert [r.status for r in split.responses] == [r.status for r in whole.responses]
    no_errors_logged(logged_errors)


def _sent(gw: ThreadedGateway, pieces: list[bytes], pause_s: float = 0.0) -> tuple[bytes, bool]:
    got = send_and_read(gw.port, pieces, pause_s=pause_s, half_close=False)
    assert got.closed
    return got.data, got.closed


def test_head_gets_the_head_of_its_answer_and_the_connection_goes_on(
        fuzz_gateway, logged_errors) -> None:
    # Regression (found by the generated requests): the handler's answer to a HEAD
    # request raised h11's LocalProtocolError ("Too much data for declared
    # Content-Length"), so the server logged a traceback and closed the connection
    # without an answer.  Now the answer's head goes out, without its body.
    raw = request("HEAD", "/healthz") + request("HEAD", "/nope") + request("GET", "/healthz")
    got = send_and_read(fuzz_gateway.port, raw)
    parsed = parse_responses(got.data, got.closed, ["HEAD", "HEAD", "GET"])
    assert [r.status for r in parsed.responses] == [405, 404, 200]
    for resp in parsed.responses[:2]:
        assert resp.body == b"" and int(resp.header(b"content-length")) > 0
    no_errors_logged(logged_errors)


# -- mutated and random bytes -----------------------------------------------------------

INTERESTING = [b"\r\n", b"\r", b"\n", b" ", b"\t", b":", b";", b",", b"0", b"1", b"f", b"-",
               b"\x00", b"\xff", b"\x7f", b"\r\n\r\n", b"chunked", b"content-length: 3\r\n",
               b"transfer-encoding: chunked\r\n", b"HTTP/1.0", b"GET / HTTP/1.1\r\n\r\n",
               b"0\r\n\r\n", b'{"', b"}", b"\\u"]
mutations = st.lists(st.tuples(
    st.sampled_from(["insert", "delete", "replace", "duplicate", "flip"]),
    st.floats(0, 1, exclude_max=True), st.sampled_from(INTERESTING), st.integers(1, 16)),
    min_size=1, max_size=4)


def mutate(raw: bytes, edits: list[tuple[str, float, bytes, int]]) -> bytes:
    buf = bytearray(raw)
    for how, where, what, span in edits:
        i = int(where * len(buf)) if buf else 0
        if how == "insert":
            buf[i:i] = what
        elif how == "delete":
            del buf[i:i + span]
        elif how == "replace":
            buf[i:i + len(what)] = what
        elif how == "duplicate":
            buf[i:i] = buf[i:i + span]
        elif buf:
            buf[min(i, len(buf) - 1)] ^= 1 << (span % 8)
    return bytes(buf)


@settings(max_examples=250)
@given(reqs=st.lists(requests().filter(lambda r: r[0] != "HEAD"), min_size=1, max_size=2),
       chunked=st.booleans(),
       edits=mutations, data=st.data())
def test_mutated_requests_are_answered_well_formed_or_closed(
        fuzz_gateway, logged_errors, reqs, chunked, edits, data) -> None:
    raw = mutate(encode(reqs, [chunked] * len(reqs)), edits)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=3))))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)]) if raw[a:b]]
    got = send_and_read(fuzz_gateway.port, pieces)
    assert got.closed, "no close within the timeout after a half-close"
    # The parser assumes GET answers: no HEAD among the bases, and no edit makes one.
    parsed = parse_responses(got.data, got.closed, cut_stream_ok=True)
    assert parsed.complete
    check_answers(parsed, [])
    for resp in parsed.responses:
        if resp.status >= 400 and resp.header(b"content-type") == b"application/json":
            body = resp.json()
            assert "error" in body and isinstance(body["error"], dict), body
    # Answers that name one of our requests come in request order.
    ids = [r.header(b"x-request-id") for r in parsed.responses]
    # (Edits may change an id too; an edited one matches none of ours.)
    mine = {rid(i).encode(): i for i in range(len(reqs))}
    ours = [mine[i] for i in ids if i in mine]
    assert ours == sorted(ours), ids  # (an edit may repeat a request: non-decreasing)
    no_errors_logged(logged_errors)
    assert healthz_ok(fuzz_gateway.port)


PREFIXES = [b"", b"GET ", b"POST /v1/chat/completions HTTP/1.1\r\n",
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"]


@settings(max_examples=150)
@given(prefix=st.sampled_from(PREFIXES), junk=st.binary(max_size=300))
def test_random_bytes_get_a_400_or_a_close(fuzz_gateway, logged_errors, prefix, junk) -> None:
    got = send_and_read(fuzz_gateway.port, prefix + junk)
    assert got.closed, "the server neither answered nor closed"
    parsed = parse_responses(got.data, got.closed, cut_stream_ok=True)
    assert parsed.complete
    check_answers(parsed, [])
    no_errors_logged(logged_errors)
    assert healthz_ok(fuzz_gateway.port)


@settings(max_examples=8)
@given(prefix=st.sampled_from(PREFIXES), junk=st.binary(max_size=100))
def test_random_bytes_without_a_half_close_end_by_the_timeouts(fuzz_gateway, logged_errors,
                                                               prefix, junk) -> None:
    # The client stays: a 400, or the header/body timeout (0.5 s here) ends it.
    got = send_and_read(fuzz_gateway.port, prefix + junk, half_close=False, timeout_s=5.0)
    assert got.closed, "the server neither answered nor closed"
    parsed = parse_responses(got.data, got.closed)
    check_answers(parsed, [])
    no_errors_logged(logged_errors)
