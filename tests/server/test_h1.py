"""The sans-IO HTTP layer: bytes in, events and bytes out."""
from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwcore import _h11
from gwcore.server.h1 import (END_OF_BODY, NEED_DATA, PAUSED, BodyChunk, H1Connection,
                              ProtocolError, RequestHead)


def events(conn: H1Connection, data: bytes | None) -> list[object]:
    if data is not None:
        conn.receive_data(data)
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return out
        out.append(ev)


def h1(**kw) -> H1Connection:
    return H1Connection(max_header_bytes=kw.get("max_header_bytes", 1024),
                        max_body_bytes=kw.get("max_body_bytes", 100))


def test_a_request_arrives_as_head_body_end_in_any_split():
    raw = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    for cut in range(1, len(raw)):
        conn = h1()
        got = events(conn, raw[:cut]) + events(conn, raw[cut:])
        assert isinstance(got[0], RequestHead)
        assert got[0].method == b"POST" and got[0].target == b"/v1/x"
        assert (b"host", b"a") in got[0].headers
        assert b"".join(e.data for e in got if isinstance(e, BodyChunk)) == b"hello"
        assert got[-1] is END_OF_BODY


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 2000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded: header\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    # A coding before a final chunked is not understood (RFC 9112 §6.1: 501); without
    # chunked last the body's length is unknown (§6.3: 400 and close, tests/hardening).
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
])
def test_bad_requests_raise_the_status_to_answer(raw, status):
    conn = h1()
    with pytest.raises(ProtocolError) as err:
        events(conn, raw)
    assert err.value.status == status
    data = conn.error_response(err.value.status, [], b"{}")
    assert data.startswith(b"HTTP/1.1 %d " % status) and b"connection: close" in data


def test_chunked_body_over_the_limit_is_413():
    conn = h1(max_body_bytes=10)
    with pytest.raises(ProtocolError) as err:
        events(conn, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert err.value.status == 413


def test_keep_alive_cycles_and_http10_closes():
    conn = h1()
    events(conn, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.response(200, [], b"ok").endswith(b"\r\n\r\nok")
    assert conn.start_next_cycle()
    got = events(conn, None)
    assert got[0].target == b"/b"
    conn.response(200, [], b"ok")
    assert conn.start_next_cycle()
    old = h1()
    events(old, b"GET / HTTP/1.0\r\n\r\n")
    old.response(200, [], b"ok")
    assert not old.start_next_cycle()


def test_streamed_response_is_chunked():
    conn = h1()
    events(conn, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = conn.response_head(200, [(b"content-type", b"text/event-stream")])
    assert b"transfer-encoding: chunked" in head.lower()
    assert conn.response_body(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    assert conn.response_end() == b"0\r\n\r\n"
    assert conn.response_done and conn.keep_alive
    assert h11.DONE  # the states come from h11 itself


# -- split_fields: the fields h11 sees and the lines written after its head -----------

FIELD_NAMES = st.sampled_from([b"host", b"Content-Length", b"connection", b"x-a", b"X-B", b"server",
                               b"bad name", b"", b"x\x00", b"transfer-encoding"])
FIELD_VALUES = st.sampled_from([b"1", b"v w", b"", b" lead", b"trail ", b"a\rb", b"a\nb", b"\x01",
                                b"\tx", b"ok\x7f", b"fine-value"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=6))
def test_split_fields_frames_what_h11_would_and_refuses_what_it_refuses(fields):
    """h11 framing the whole list and h11 framing the framing fields plus our lines
    agree: the same head bytes (up to the order of the fields), and what h11 refuses is
    refused.  We refuse more: a control character in a value (RFC 9110 §5.5), which
    h11 lets through."""
    def h11_head(headers: list[tuple[bytes, bytes]]) -> bytes:
        conn = _h11.h11.Connection(_h11.h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
        return conn.send(_h11.h11.Response(status_code=200, headers=headers))

    whole: bytes | None
    try:
        whole = h11_head(fields)
    except _h11.h11.LocalProtocolError:
        whole = None
    try:
        framing, block = _h11.split_fields(fields)
        ours: bytes | None = _h11.with_fields(h11_head(framing), block)
    except _h11.h11.LocalProtocolError:
        ours = None
    if whole is None:
        assert ours is None, (fields, ours)
    elif ours is None:
        assert any(c < 0x20 and c != 0x09 or c == 0x7f for _, v in fields for c in v), (fields, whole)
    else:  # an empty value is "name:" in ours, "name: " in h11's
        def lines(head: bytes) -> list[bytes]:
            return sorted(line.replace(b": ", b":", 1) for line in head.split(b"\r\n"))
        assert lines(whole) == lines(ours)


def test_split_fields_stays_right_when_its_name_cache_is_emptied(monkeypatch):
    monkeypatch.setattr(_h11, "_names", {})
    for i in range(5000):  # more names than the cache keeps: it is emptied on the way
        fields = [(b"x-known", b"1"), (b"content-length", b"2"), (b"x-n%d" % i, b"v")]
        framing, block = _h11.split_fields(fields)
        assert framing == [(b"content-length", b"2")] and block == b"x-known: 1\r\nx-n%d: v\r\n" % i
    assert len(_h11._names) <= 4096
    with pytest.raises(_h11.h11.LocalProtocolError):
        _h11.split_fields([(b"x-fresh", b"1"), (b"bad name", b"2")])
