"""Request smuggling: every framing a front proxy might read differently than the
gateway is refused with a 400 (or the listed status) and a close, and the request
appended after it is never answered as a request of its own.

Each case sends ``prefix + SMUGGLED`` over a real socket to the running gateway (demo
mode), half-closes, and reads until the server closes.  The gateway's checks are in
``gwcore/server/h1.py`` (see its docstring table); RFC 9112 sections are cited per case.
"""
from __future__ import annotations

import time

import pytest

from tests.hardening.wire import (assert_error_format, exchange, healthz_ok, parse_responses,
                                  send_and_read)

# If any framing below let the gateway read this as a request, it would get a 404 with
# this request id: it must never appear in an answer or in the access log.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nhost: x\r\nx-request-id: smuggled\r\n\r\n"
POST = b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\n"
BODY = b'{"model":"mock-1","input":"hi"}'
CHUNKED = POST + b"transfer-encoding: chunked\r\n\r\n"


def chunked_body(size_line: bytes, data: bytes = b"hello", after: bytes = b"\r\n") -> bytes:
    return CHUNKED + size_line + b"\r\n" + data + after + b"0\r\n\r\n"


CASES = {
    # -- Content-Length and Transfer-Encoding (RFC 9112 §6.3) ----------------------
    "cl-then-te": (POST + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-then-cl": (POST + b"transfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n", 400),
    "te-then-cl-zero": (POST + b"transfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n", 400),
    "duplicate-identical-cl": (POST + b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}", 400),
    "conflicting-cl": (POST + b"content-length: 2\r\ncontent-length: 40\r\n\r\n{}", 400),
    "cl-list": (POST + b"content-length: 2, 2\r\n\r\n{}", 400),
    "cl-plus-sign": (POST + b"content-length: +2\r\n\r\n{}", 400),
    "cl-minus-sign": (POST + b"content-length: -2\r\n\r\n{}", 400),
    "cl-hex": (POST + b"content-length: 0x2\r\n\r\n{}", 400),
    "cl-inner-space": (POST + b"content-length: 1 2\r\n\r\n{}", 400),
    "cl-empty": (POST + b"content-length: \r\n\r\n{}", 400),
    "cl-space-before-colon": (POST + b"content-length : 2\r\n\r\n{}", 400),
    "cl-21-digits": (POST + b"content-length: " + b"9" * 21 + b"\r\n\r\n{}", 400),
    "cl-vertical-tab": (POST + b"content-length:\x0b2\r\n\r\n{}", 400),
    # -- Transfer-Encoding values (§6.1, §6.3 item 4, §7.1) ----------------------
    "te-chunked-identity": (POST + b"transfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "te-identity": (POST + b"transfer-encoding: identity\r\n\r\n0\r\n\r\n", 400),
    "te-xchunked": (POST + b"transfer-encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "te-chunked-twice": (POST + b"transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    "te-two-headers": (POST + b"transfer-encoding: chunked\r\ntransfer-encoding: chunked"
                       b"\r\n\r\n0\r\n\r\n", 400),
    "te-chunked-with-params": (POST + b"transfer-encoding: chunked;q=1\r\n\r\n0\r\n\r\n", 400),
    "te-space-before-colon": (POST + b"transfer-encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te-in-http10": (b"POST /v1/embeddings HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked"
                     b"\r\n\r\n0\r\n\r\n", 400),
    # A coding the gateway cannot decode, chunked last: "not implemented" (§6.1).
    "te-gzip-chunked": (POST + b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # -- line folding, bare CR and LF in the head (§2.2, §5.2) --------------------
    "obs-fold": (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\r\n c\r\n\r\n", 400),
    "obs-fold-tab": (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\r\n\tc\r\n\r\n", 400),
    "obs-fold-te": (POST + b"transfer-encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    "leading-space-te": (POST + b" transfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bare-cr-in-value": (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\rx-c: d\r\n\r\n", 400),
    "bare-cr-line-end": (b"GET /healthz HTTP/1.1\rhost: x\r\n\r\n", 400),
    "bare-lf-request-line": (b"GET /healthz HTTP/1.1\nhost: x\r\n\r\n", 400),
    "bare-lf-header": (POST + b"x-a: b\ncontent-length: 2\r\n\r\n{}", 400),
    "bare-lf-everywhere": (b"GET /healthz HTTP/1.1\nhost: x\n\n", 400),
    "cr-before-crlf": (b"GET /healthz HTTP/1.1\r\nhost: x\r\r\n\r\n", 400),
    # -- chunk sizes and extensions (§7.1) ---------------------------------------
    "chunk-negative": (chunked_body(b"-5"), 400),
    "chunk-hex-prefix": (chunked_body(b"0x5"), 400),
    "chunk-hex-overflow-17-digits": (chunked_body(b"1" + b"0" * 15 + b"5"), 400),
    "chunk-hex-overflow-wraps-to-5": (chunked_body(b"10000000000000005"), 400),
    "chunk-size-leading-space": (chunked_body(b" 5"), 400),
    "chunk-size-inner-space": (chunked_body(b"5 5"), 400),
    "chunk-size-empty": (chunked_body(b""), 400),
    "chunk-size-bare-lf": (CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),
    "chunk-size-bare-cr": (CHUNKED + b"5\rhello\r\n0\r\n\r\n", 400),
    "chunk-data-missing-crlf": (chunked_body(b"5", after=b""), 400),
    "chunk-data-too-long": (chunked_body(b"5", data=b"hello!!"), 400),
    "chunk-data-bare-lf": (chunked_body(b"5", after=b"\n"), 400),
    "chunk-ext-control-byte": (chunked_body(b"5;\x01"), 400),
    "chunk-ext-bare-cr": (chunked_body(b"5;a\rb"), 400),
    "chunk-ext-no-name": (chunked_body(b"5;"), 400),
    "chunk-ext-no-value": (chunked_body(b"5;a="), 400),
    "chunk-ext-unterminated-quote": (chunked_body(b'5;a="x'), 400),
    "chunk-ext-space-in-name": (chunked_body(b"5;a b"), 400),
    "chunk-ext-too-long": (chunked_body(b"5;a=" + b"x" * 5000), 400),
    "last-chunk-bare-lf": (CHUNKED + b"5\r\nhello\r\n0\n\r\n", 400),
    "trailer-bare-lf": (CHUNKED + b"5\r\nhello\r\n0\r\nx-t: 1\n\r\n", 400),
    "trailer-obs-fold": (CHUNKED + b"5\r\nhello\r\n0\r\nx-t: 1\r\n 2\r\n\r\n", 400),
    # A size beyond max_body_bytes is refused at once, before its data is read.
    "chunk-larger-than-the-body-limit": (chunked_body(b"ffffffffffffffff"), 413),
    # -- versions ------------------------------------------------------------------
    "http-2-request-line": (b"GET /healthz HTTP/2.0\r\nhost: x\r\n\r\n", 505),
    "h2-prior-knowledge-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "http-0.9": (b"GET /healthz HTTP/0.9\r\nhost: x\r\n\r\n", 505),
}


# Regressions: before the checks in gwcore/server/h1.py, h11 alone served these (and
# then answered the smuggled request, or read it as body), or answered 501 where RFC
# 9112 §6.3 requires a 400 and a close, or answered HTTP/2 as HTTP/1.1.
WERE_ACCEPTED = {
    "duplicate-identical-cl", "cl-list", "te-in-http10", "bare-lf-request-line",
    "bare-lf-header", "bare-lf-everywhere", "chunk-hex-overflow-17-digits",
    "chunk-hex-overflow-wraps-to-5", "chunk-ext-control-byte", "chunk-ext-bare-cr",
    "chunk-ext-no-name", "chunk-ext-no-value", "chunk-ext-unterminated-quote",
    "chunk-ext-space-in-name", "chunk-ext-too-long", "trailer-bare-lf", "trailer-obs-fold",
    "chunk-larger-than-the-body-limit", "http-2-request-line", "h2-prior-knowledge-preface",
    "http-0.9"}
WERE_501 = {"te-chunked-identity", "te-identity", "te-xchunked", "te-chunked-twice",
            "te-two-headers", "te-chunked-with-params"}
assert WERE_ACCEPTED | WERE_501 <= set(CASES)


@pytest.mark.parametrize("raw,status", list(CASES.values()), ids=list(CASES))
def test_ambiguous_framing_is_refused_and_what_follows_is_never_a_request(
        demo_gateway, raw: bytes, status: int) -> None:
    parsed, got = exchange(demo_gateway.port, raw + SMUGGLED)
    assert got.closed, "the server kept the connection open after a framing error"
    assert [r.status for r in parsed.responses] == [status], parsed.responses
    resp = parsed.responses[0]
    assert resp.header(b"connection") == b"close"
    assert_error_format(resp, "/v1/embeddings")
    assert b"smuggled" not in got.data
    assert healthz_ok(demo_gateway.port)


@pytest.mark.parametrize("raw,status", list(CASES.values()), ids=list(CASES))
def test_the_verdict_does_not_depend_on_how_the_bytes_arrive(
        demo_gateway, raw: bytes, status: int) -> None:
    # Byte by byte, in small pieces with pauses, so every split point of the framing
    # lines is crossed by a read.
    pieces = [raw[i:i + 3] for i in range(0, len(raw), 3)]
    if len(pieces) > 200:
        pieces = pieces[:100] + [b"".join(pieces[100:])]
    got = send_and_read(demo_gateway.port, pieces + [SMUGGLED], pause_s=0.0005)
    parsed = parse_responses(got.data, got.closed)
    assert got.closed
    assert [r.status for r in parsed.responses] == [status]
    assert b"smuggled" not in got.data


def test_the_smuggled_requests_never_reached_the_handler(demo_gateway) -> None:
    # Runs after the cases above (same module gateway): nothing was logged for them,
    # while a request that did reach the handler was (the log is working).
    parsed, _ = exchange(demo_gateway.port, b"GET /logged HTTP/1.1\r\nhost: x\r\n\r\n")
    assert [r.status for r in parsed.responses] == [404]
    deadline = time.monotonic() + 5
    while not [r for r in demo_gateway.log_lines() if r["path"] == "/logged"]:
        assert time.monotonic() < deadline, "the access log never showed /logged"
        time.sleep(0.01)
    assert not [r for r in demo_gateway.log_lines() if "smuggled" in r["path"]
                or r["request_id"] == "smuggled"]


@pytest.mark.parametrize("raw", [
    # Framings that are fine: a proxy agrees with the gateway on each.
    POST + b"content-length: %d\r\n\r\n" % len(BODY) + BODY,
    POST + b"content-length:   %d  \r\n\r\n" % len(BODY) + BODY,  # OWS around the value
    POST + b"transfer-encoding: chunked\r\n\r\n%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
    POST + b"Transfer-Encoding: CHUNKED\r\n\r\n%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
    POST + b"transfer-encoding: chunked\r\n\r\n%x;name=val;q=\"a \\\" b\"\r\n" % len(BODY) + BODY
    + b"\r\n0;last\r\nx-trailer: yes\r\n\r\n",
    POST + b"transfer-encoding: chunked\r\n\r\n%016x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
], ids=["cl", "cl-ows", "chunked", "chunked-uppercase", "chunk-extensions-and-trailer",
        "chunk-size-16-digits"])
def test_valid_framings_are_served_and_the_next_request_too(demo_gateway, raw: bytes) -> None:
    follow = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: after\r\n\r\n"
    parsed, got = exchange(demo_gateway.port, raw + follow)
    assert [r.status for r in parsed.responses] == [200, 200], parsed.responses
    assert parsed.responses[0].json()["data"][0]["object"] == "embedding"
    assert parsed.responses[1].header(b"x-request-id") == b"after"


# Regression: render_protocol_error rendered 501/505 as an internal_error.
@pytest.mark.parametrize("name", ["te-gzip-chunked", "http-2-request-line"])
def test_a_protocol_501_or_505_does_not_claim_an_internal_error(demo_gateway, name: str) -> None:
    parsed, _ = exchange(demo_gateway.port, CASES[name][0])
    error = parsed.responses[0].json()["error"]
    assert error["code"] != "internal_error" and error["type"] == "invalid_request_error"
