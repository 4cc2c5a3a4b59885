"""Blocking-socket helpers for the hardening tests: send raw bytes, read everything the
server says until it closes (each read under a timeout), and split what came back into
well-formed HTTP/1.1 responses with an h11 client (which raises on anything malformed).
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson

# Statuses the server may answer on its own for a request it cannot take: they are
# protocol answers, not failures of the gateway's code.
PROTOCOL_5XX = {501, 505}


@dataclass
class Received:
    data: bytes
    closed: bool        # the server closed (EOF or reset) within the timeout
    reset: bool = False


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        return self.headers.get(name, default)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Parsed:
    responses: list[Response] = field(default_factory=list)
    complete: bool = True   # False: the bytes stopped in the middle of a response
    cut_stream: Response | None = None  # a last stream cut by the close (see below)


def send_and_read(port: int, pieces: list[bytes] | bytes, *, half_close: bool = True,
                  timeout_s: float = 5.0, pause_s: float = 0.0,
                  rcvbuf: int | None = None) -> Received:
    """Send ``pieces`` (pausing ``pause_s`` between them), optionally shut our sending
    side, then read until the server closes or ``timeout_s`` passes in all."""
    if isinstance(pieces, bytes):
        pieces = [pieces]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout_s)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        try:
            for i, piece in enumerate(pieces):
                if i and pause_s:
                    time.sleep(pause_s)
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed: read what it said
        return read_until_close(sock, timeout_s)
    finally:
        sock.close()


def read_until_close(sock: socket.socket, timeout_s: float) -> Received:
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return Received(b"".join(chunks), closed=False)
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return Received(b"".join(chunks), closed=False)
        except ConnectionResetError:
            return Received(b"".join(chunks), closed=True, reset=True)
        if not data:
            return Received(b"".join(chunks), closed=True)
        chunks.append(data)


def parse_responses(data: bytes, closed: bool, methods: list[str] | None = None, *,
                    cut_stream_ok: bool = False) -> Parsed:
    """The responses in ``data``, in order.  ``methods`` are the requests' methods (a
    HEAD answer has no body); past them, GET is assumed.  h11 raises
    ``RemoteProtocolError`` on a malformed response or one cut by the close.

    ``cut_stream_ok``: a client that half-closes while a stream is being sent may be
    taken for one that left (the server cannot tell; see gwcore/server/connection.py),
    so its last stream may end early; with this, such a last response (a 200 SSE
    stream, cut by the close) is kept in ``cut_stream`` instead of raising."""
    methods = methods or []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if closed:
        conn.receive_data(b"")
    out = Parsed()
    if not data:
        return out
    while True:
        method = methods[len(out.responses)] if len(out.responses) < len(methods) else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        resp: Response | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if cut_stream_ok and closed and resp is not None and resp.status == 200 \
                        and resp.header(b"content-type", b"").startswith(b"text/event-stream"):
                    out.cut_stream = resp
                    return out
                raise
            if event is h11.NEED_DATA:
                out.complete = resp is None and not conn.trailing_data[0]
                return out
            if isinstance(event, h11.ConnectionClosed):
                assert resp is None
                return out
            if isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"unexpected 1xx response: {event!r}")
            if isinstance(event, h11.Response):
                resp = Response(event.status_code, dict(event.headers))
            elif isinstance(event, h11.Data):
                assert resp is not None
                resp.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert resp is not None
                out.responses.append(resp)
                break
        if conn.their_state is not h11.DONE:
            # The server said it closes after this one: nothing may follow.
            assert not conn.trailing_data[0], "bytes after a response that closes"
            return out
        conn.start_next_cycle()
        if not conn.trailing_data[0]:
            return out


def exchange(port: int, raw: bytes, *, methods: list[str] | None = None,
             timeout_s: float = 5.0, half_close: bool = True) -> tuple[Parsed, Received]:
    got = send_and_read(port, raw, timeout_s=timeout_s, half_close=half_close)
    return parse_responses(got.data, got.closed, methods), got


def healthz_ok(port: int, timeout_s: float = 5.0) -> bool:
    """A normal client is served: GET /healthz on a fresh connection gets a 200."""
    parsed, got = exchange(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", timeout_s=timeout_s)
    return got.closed and len(parsed.responses) == 1 and parsed.responses[0].status == 200


def assert_error_format(resp: Response, path: str) -> None:
    """A 4xx/5xx body in the format of the API at ``path`` (DESIGN.md, Errors)."""
    body = resp.json()
    if path.endswith("/messages"):
        assert body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str)
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)


def request(method: str, target: str, body: bytes | None = None, *,
            headers: list[tuple[str, str]] | None = None, chunked: bool = False,
            version: str = "1.1") -> bytes:
    """A well-formed request, framed by content-length (or chunked) when it has a body."""
    lines = [f"{method} {target} HTTP/{version}", "host: gw"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body is not None:
        lines.append("transfer-encoding: chunked" if chunked else f"content-length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None:
        return head
    if chunked:
        return head + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return head + body
