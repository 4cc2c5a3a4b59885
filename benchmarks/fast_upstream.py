"""A fast mock OpenAI upstream for benchmarks: stdlib asyncio, precomputed answers.

How this works: one ``asyncio.Protocol`` per connection with a minimal HTTP/1.1 request
parser (request line, the three headers that matter, ``Content-Length`` or chunked
bodies, keep-alive, pipelined requests). What to answer is decided by the reference mock,
``tests/support/mock_openai.py`` (the one the gateway's tests check against the official
SDK), so the bodies and events are the same byte for byte (ids aside); the fast part is
that a decided answer is rendered once and kept, keyed by the request body. A repeated request (what a
load generator sends) costs a dict lookup and a join that puts a fresh id in:
``chatcmpl-...`` ids and ``x-request-id`` stay unique, lengths stay the same.

Answers that wait (``latency_s``, ``first_byte_s``, a streaming pace) are timers on the
event loop, never tasks, so thousands of slow streams cost a few hundred bytes each. A
connection answers its pipelined requests in order: while one answer waits, the bytes
behind it stay buffered. A client that closes its side mid-answer cancels the answer.

Per connection:

    state       event                                   next
    idle        a whole request (head + body) buffered  answer it (at once or on a timer)
    idle        a partial request                       keep the bytes, wait
    answering   the timed answer is written             idle (buffered requests next)
    answering   EOF / connection lost                   closed, timers cancelled
    any         a malformed request, head over 64 KiB   400 / 431 and close

Per-request knobs, for a load driver that only controls the request (another gateway in
between passes the model name on): a model named ``<name>@k=v,k=v`` is answered as
``<name>`` would be, with these overrides, and echoed as sent:

    tps=N     streaming pace, tokens per second (0: as fast as possible)
    words=N   reply length in words
    fb=MS     delay before the response head
    lat=MS    extra latency of a non-streaming answer

e.g. ``gpt-4o-mini@tps=0.5`` streams the 9-word reply over 18 s.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from tests.support.mock_openai import (  # noqa: E402
    _HEALTHZ_BODY,
    _REASONS,
    DEFAULT_REPLY,
    MockOpenAI,
    _Answer,
    _Chat,
    _error_body,
)

# 64 KiB: the gateway's own header block limit (DESIGN.md); above it, 431.
MAX_HEAD_BYTES = 64 * 1024
# Rendered answers kept; a benchmark repeats a handful of requests, a stray client
# sending unique bodies only resets the table.
MAX_CACHED = 4096
# 4096: SOMAXCONN on current Linux; thousands of slow streams connect in bursts.
BACKLOG = 4096
# The variable part of the reference mock's ids (12 random + 17 digits); ours has the
# same length, so a rendered answer's lengths never change.
ID_CHARS = 29
_KNOBS = {"tps": float, "words": int, "fb": float, "lat": float}
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"


def reply_of(words: int) -> str:
    """A reply of exactly `words` words, cycling through the default reply."""
    base = DEFAULT_REPLY.split()
    return " ".join(base[i % len(base)] for i in range(words))


def parse_model_knobs(model: str) -> dict[str, float]:
    """``gpt-4o-mini@tps=2,words=50`` -> {"tps": 2.0, "words": 50}; bad knobs are ignored."""
    _, sep, spec = model.partition("@")
    knobs: dict[str, float] = {}
    if not sep:
        return knobs
    for item in spec.split(","):
        name, _, value = item.partition("=")
        kind = _KNOBS.get(name.strip())
        if kind is None:
            continue
        try:
            knobs[name.strip()] = max(0, kind(value))
        except ValueError:
            continue
    return knobs


@dataclass(frozen=True, slots=True)
class Knobs:
    latency_s: float = 0.0
    first_byte_s: float = 0.0
    tokens_per_s: float = 0.0
    reply_words: int | None = None


@dataclass(slots=True)
class _Rendered:
    """One decided answer, ready to write. ``parts`` joined with a fresh id give the body
    (a stream: the chunked events, one part list per event)."""

    status: int
    content_type: bytes
    stream: bool
    parts: list[bytes] | None  # non-stream body split at the answer's id (None: no id)
    body: bytes  # non-stream body when parts is None
    events: list[tuple[bool, list[bytes]]]  # stream: (is a paced token, event split at the id)
    latency_s: float
    first_byte_s: float
    tokens_per_s: float


class FastOpenAI:
    """The shared state of the server: the default knobs, the deciders and the rendered answers."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self._deciders: dict[int | None, MockOpenAI] = {}
        self._rendered: dict[tuple[bytes, bytes, bytes], _Rendered] = {}
        self._ids = itertools.count(1)
        self._id_tag = os.urandom(6).hex().encode()  # 12 characters, as the reference mock's
        self.requests = 0
        self.connections_open = 0

    def decider(self, words: int | None) -> MockOpenAI:
        found = self._deciders.get(words)
        if found is None:
            found = MockOpenAI(record=False) if words is None else MockOpenAI(record=False, reply=reply_of(words))
            self._deciders[words] = found
        return found

    def next_id(self) -> bytes:
        return self._id_tag + b"%017d" % next(self._ids)

    def render(self, method: bytes, path: bytes, body: bytes) -> _Rendered:
        key = (method, path, body)
        found = self._rendered.get(key)
        if found is None:
            found = self._decide(method, path, body)
            if len(self._rendered) >= MAX_CACHED:
                self._rendered.clear()
            self._rendered[key] = found
        return found

    def _decide(self, method: bytes, raw_path: bytes, body: bytes) -> _Rendered:
        k = self.knobs
        latency_s, first_byte_s, tokens_per_s, words = k.latency_s, k.first_byte_s, k.tokens_per_s, k.reply_words
        path = raw_path.split(b"?", 1)[0].decode("latin-1")
        route = path[3:] if path.startswith("/v1/") else path
        if route == "/healthz":
            return _simple(_Answer(200, _HEALTHZ_BODY))
        knobs: dict[str, float] = {}
        if method == b"POST" and route == "/chat/completions" and b"@" in body:
            try:
                model = orjson.loads(body).get("model")
            except (orjson.JSONDecodeError, AttributeError):
                model = None
            if isinstance(model, str):
                knobs = parse_model_knobs(model)
        if "words" in knobs:
            words = int(knobs["words"])
        tokens_per_s = knobs.get("tps", tokens_per_s)
        first_byte_s = knobs["fb"] / 1000 if "fb" in knobs else first_byte_s
        latency_s = knobs["lat"] / 1000 if "lat" in knobs else latency_s
        plan, streaming = self.decider(words)._decide(method, route, path, body)
        if isinstance(plan, _Answer):
            rendered = _simple(plan)
        else:
            rendered = _render_plan(plan, streaming)
        rendered.latency_s = 0.0 if streaming else latency_s
        rendered.first_byte_s = first_byte_s
        rendered.tokens_per_s = tokens_per_s if streaming else 0.0
        return rendered


def _simple(answer: _Answer) -> _Rendered:
    if answer.headers:  # forced errors only; the fast mock has no knob for them
        raise AssertionError("extra headers are not supported by the fast mock")
    return _Rendered(answer.status, _JSON, False, None, answer.body, [], 0.0, 0.0, 0.0)


def _render_plan(plan: _Chat, streaming: bool) -> _Rendered:
    # The reference mock's ids: a prefix ("chatcmpl-", "resp_"), then ID_CHARS characters.
    old = plan.id[-ID_CHARS:].encode()
    if streaming:
        events = []
        for is_token, event in plan.events():
            framed = b"%x\r\n%s\r\n" % (len(event), event)
            events.append((is_token, framed.split(old)))
        return _Rendered(200, _SSE, True, None, b"", events, 0.0, 0.0, 0.0)
    return _Rendered(200, _JSON, False, plan.completion().split(old), b"", [], 0.0, 0.0, 0.0)


def _head(status: int, content_type: bytes, request_id: bytes, length: int | None, close: bool) -> bytes:
    """A response head. length None: chunked (close-delimited when `close`)."""
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nx-request-id: req_%s\r\nopenai-version: 2020-10-01\r\n"
            b"openai-processing-ms: 0\r\n" % (status, _REASONS.get(status, b""), content_type, request_id))
    if length is not None:
        head += b"content-length: %d\r\n" % length
    elif not close:
        head += b"transfer-encoding: chunked\r\n"
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n"


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "loop", "transport", "buf", "busy", "closed", "timer")

    def __init__(self, server: FastOpenAI, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a timed answer is pending: requests behind it wait in buf
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections_open -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool:
        # A client that closes its side while we answer has given up (or is done):
        # close, which cancels any timed answer.
        return False

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.process()

    def process(self) -> None:
        """Answer every whole request in the buffer, until one must wait."""
        buf = self.buf
        pos = 0
        out: list[bytes] = []
        transport = self.transport
        assert transport is not None
        while pos < len(buf):
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEAD_BYTES:
                    self._fail(out, 431, "Request header fields too large")
                    return
                break
            line_end = buf.find(b"\r\n", pos)
            parts = buf[pos:line_end].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                self._fail(out, 400, "Malformed request line")
                return
            method, target, version = parts
            length = 0
            chunked = False
            close = version == b"HTTP/1.0"
            for line in buf[line_end + 2:end].split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if not sep:
                    self._fail(out, 400, "Malformed header line")
                    return
                name = name.lower()
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self._fail(out, 400, "Bad content-length")
                        return
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    lowered = value.lower()
                    if b"close" in lowered:
                        close = True
                    elif b"keep-alive" in lowered:
                        close = False
            start = end + 4
            if chunked:
                decoded = _dechunk(buf, start)
                if decoded is None:
                    break
                if decoded is False:
                    self._fail(out, 400, "Malformed chunked body")
                    return
                body, after = decoded
            else:
                after = start + length
                if after > len(buf):
                    break
                body = buf[start:after]
            pos = after
            server = self.server
            server.requests += 1
            rendered = server.render(method, target, body)
            if rendered.tokens_per_s or rendered.latency_s or rendered.first_byte_s:
                self.buf = buf[pos:]
                if out:
                    transport.write(b"".join(out))
                self.busy = True
                _Timed(self, rendered, close).start()
                return
            out.append(_whole(server, rendered, close))
            if close:
                self.buf = b""
                transport.write(b"".join(out))
                transport.close()
                return
        self.buf = buf[pos:]
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def answered(self, close: bool) -> None:
        """A timed answer is done: close, or go on with the buffered requests."""
        self.busy = False
        self.timer = None
        if self.closed:
            return
        if close:
            assert self.transport is not None
            self.transport.close()
            return
        if self.buf:
            self.process()

    def _fail(self, out: list[bytes], status: int, message: str) -> None:
        body = _error_body(message, "invalid_request_error", None)
        out.append(_head(status, _JSON, self.server.next_id(), len(body), True) + body)
        assert self.transport is not None
        self.transport.write(b"".join(out))
        self.transport.close()
        self.buf = b""


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None | bool:
    """A chunked body starting at pos: (body, end), None if incomplete, False if malformed."""
    pieces = []
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
        except ValueError:
            return False
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            if trailer_end < 0:
                return None if buf.find(b"\r\n", line_end + 2) < 0 else (b"".join(pieces), line_end + 4)
            return b"".join(pieces), trailer_end + 4
        start = line_end + 2
        if start + size + 2 > len(buf):
            return None
        pieces.append(buf[start:start + size])
        pos = start + size + 2


def _whole(server: FastOpenAI, rendered: _Rendered, close: bool) -> bytes:
    """A whole answer in one piece: a plain one, or a stream that need not wait."""
    new_id = server.next_id()
    if rendered.stream:
        head = _head(200, rendered.content_type, new_id, None, close)
        if close:
            return head + b"".join(_unframe(new_id.join(parts)) for _, parts in rendered.events)
        return head + b"".join(new_id.join(parts) for _, parts in rendered.events) + b"0\r\n\r\n"
    body = rendered.body if rendered.parts is None else new_id.join(rendered.parts)
    return _head(rendered.status, rendered.content_type, new_id, len(body), close) + body


class _Timed:
    """One answer that waits: a delayed whole answer, or a stream (paced or not).

    A stream writes its events as they fall due (the trio mock's schedule: each token
    event one interval after the previous token, other events right away); the events
    due at one moment go out in one write."""

    __slots__ = ("conn", "rendered", "close", "index", "next_at", "interval_s", "new_id", "started", "due")

    def __init__(self, conn: _Connection, rendered: _Rendered, close: bool) -> None:
        self.conn = conn
        self.rendered = rendered
        self.close = close
        self.index = 0
        self.interval_s = 1.0 / rendered.tokens_per_s if rendered.tokens_per_s > 0 else 0.0
        self.next_at = 0.0
        self.new_id = b""
        self.started = False
        self.due = False  # the token at `index` has waited for its time already

    def start(self) -> None:
        r = self.rendered
        delay_s = r.first_byte_s + r.latency_s
        if delay_s > 0:
            self.conn.timer = self.conn.loop.call_later(delay_s, self.step)
        else:
            self.step()

    def step(self) -> None:
        conn, r = self.conn, self.rendered
        conn.timer = None
        if conn.closed:
            return
        transport = conn.transport
        assert transport is not None
        if not r.stream or not self.interval_s:
            transport.write(_whole(conn.server, r, self.close))
            conn.answered(self.close)
            return
        out: list[bytes] = []
        chunked = not self.close
        if not self.started:
            self.started = True
            self.new_id = conn.server.next_id()
            out.append(_head(200, r.content_type, self.new_id, None, self.close))
            self.next_at = conn.loop.time()
        events, new_id = r.events, self.new_id
        while self.index < len(events):
            is_token, parts = events[self.index]
            if is_token and self.interval_s and not self.due:
                self.next_at += self.interval_s
                if self.next_at > conn.loop.time():
                    if out:
                        transport.write(b"".join(out))
                    self.due = True
                    conn.timer = conn.loop.call_at(self.next_at, self.step)
                    return
            self.due = False
            event = new_id.join(parts)
            out.append(event if chunked else _unframe(event))
            self.index += 1
        if chunked:
            out.append(b"0\r\n\r\n")
        transport.write(b"".join(out))
        conn.answered(self.close)


def _unframe(framed: bytes) -> bytes:
    """A chunk's payload (a close-delimited body has no chunk framing)."""
    return framed[framed.index(b"\r\n") + 2:-2]


async def serve(host: str, port: int, knobs: Knobs, ready: Callable[[str], None]) -> None:
    """Serve on asyncio until SIGTERM or SIGINT; `ready` gets the base URL once listening."""
    loop = asyncio.get_running_loop()
    state = FastOpenAI(knobs)
    server = await loop.create_server(lambda: _Connection(state, loop), host, port, backlog=BACKLOG,
                                      reuse_address=True)
    bound_port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready(f"http://{host}:{bound_port}/v1")
    async with server:
        await stop.wait()


def run(host: str, port: int, knobs: Knobs, ready: Callable[[str], None], loop_impl: str = "auto") -> None:
    """Serve until SIGTERM/SIGINT on asyncio's loop, or uvloop's (`auto`: uvloop when installed).

    (A bare epoll loop was tried: about 15% less CPU per request than asyncio's, most of
    the cost being the kernel's; not worth its code.)"""
    runner: Any = asyncio.run
    if loop_impl in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            if loop_impl == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed") from None
        else:
            runner = uvloop.run
    runner(serve(host, port, knobs, ready))


__all__ = ["FastOpenAI", "Knobs", "parse_model_knobs", "reply_of", "run", "serve"]
