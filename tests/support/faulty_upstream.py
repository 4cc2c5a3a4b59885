"""A fault-injecting upstream: a raw trio socket server that speaks OpenAI's wire format
when it behaves, and breaks in the ways real upstreams and the networks in front of them
break when it does not.

How this works: one trio task per TCP connection reads a request with h11 (head and
body), then answers according to ``mode`` (read at the start of each request), writing
raw bytes: the faults are about bytes on the wire (a Content-Length that lies, a chunked
body that never ends, a reset), which an HTTP library would not let us write.

    mode        non-stream request                      stream request
    ----        ------------------                      --------------
    ok          200 chat.completion                     200 SSE chunks, usage, [DONE]
    reset       head + half the body, then RST          head + ``events`` events (and half
                (SO_LINGER 0)                           of the next one), then RST
    stall       head + half the body, then nothing      head + ``events`` events, then
                (until the client gives up)             nothing (until the client gives up)
    garbage     200 application/json, an HTML page      head + ``events`` events, then
                                                        lines that are not SSE, clean end
    truncated   Content-Length larger than the body     head + ``events`` events + half of
                sent, then close (FIN)                  the next, then FIN (no last chunk)
    slow        nothing for ``first_byte_delay_s``,     the same
                then as ``ok``
    drip        after ``first_byte_delay_s`` the head   as ``slow``
                and half the body, the rest as long
                again later (each wait within a read
                timeout, the whole beyond a total one)
    status      ``status`` (default 429) with OpenAI's  the same
                error body, ``retry-after`` when
                ``retry_after`` is set

``events`` (default 1) is how many complete SSE events a broken stream sends before it
breaks: 0 breaks before the first event reaches the gateway, so the gateway can still
fail over; 1 or more breaks after the first byte went on to the client.

Connection refused needs no server: ``closed_port()`` is a port bound but never listening.

Observations: ``counts`` (requests per path), ``connections_open``, ``connections_total``,
``requests_total``.  Only ``ok``, ``slow``, ``drip`` and ``status`` keep a connection
alive.

``python -m tests.support.faulty_upstream --mode status --status 500 [--port 0]`` serves
one mode standalone (the soak benchmark uses it) and prints
``faulty upstream listening on http://HOST:PORT/v1``.
"""
from __future__ import annotations

import argparse
import collections
import functools
import itertools
import signal
import socket
import struct
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import h11
import orjson
import trio

MODES = ("ok", "reset", "stall", "garbage", "truncated", "slow", "drip", "status")
REPLY = "Hello from the faulty upstream when it behaves."
# What a misconfigured proxy or a captive portal answers instead of an event stream.
GARBAGE = (b"<html><head><title>502 Bad Gateway</title></head>\r\n"
           b"<body><center><h1>502 Bad Gateway</h1></center></body></html>\r\n"
           b"\x00\x01\x02\xfe\xff not an event stream {\"half\": \r\n\r\n")
RECV_BYTES = 64 * 1024


_RESERVED: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port nothing listens on: connection refused.

    The port stays bound (never listening) by this process, so no other process on a
    shared machine can take it and answer in its place; every call returns the same."""
    if not _RESERVED:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        _RESERVED.append(s)
    return _RESERVED[0].getsockname()[1]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


class FaultyUpstream:
    def __init__(self, mode: str = "ok", *, events: int = 1, status: int = 429,
                 retry_after: str | None = None, first_byte_delay_s: float = 1.0,
                 model_reply: str = REPLY) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.mode = mode
        self.events = events
        self.status = status
        self.retry_after = retry_after
        self.first_byte_delay_s = first_byte_delay_s
        self.reply = model_reply
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests_total = 0
        self.connections_open = 0
        self.connections_total = 0
        self._ids = itertools.count()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def statistics(self) -> dict[str, int]:
        return {"requests_total": self.requests_total, "connections_open": self.connections_open,
                "connections_total": self.connections_total}

    # -- bodies (OpenAI's chat formats, https://platform.openai.com/docs/api-reference/chat)

    def _completion(self, model: str) -> bytes:
        words = self.reply.split()
        return orjson.dumps({
            "id": f"chatcmpl-faulty{next(self._ids)}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                      "total_tokens": 10 + len(words)}})

    def _events(self, model: str, include_usage: bool) -> list[bytes]:
        cid, created = f"chatcmpl-faulty{next(self._ids)}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                                    "created": created, "model": model,
                                    "system_fingerprint": None,
                                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        words = self.reply.split()
        out = [chunk({"role": "assistant", "content": "", "refusal": None})]
        out += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        out.append(chunk({}, "stop"))
        if include_usage:
            out.append(_sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": None, "choices": [],
                             "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                                       "total_tokens": 10 + len(words)}}))
        out.append(b"data: [DONE]\n\n")
        return out

    # -- I/O

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        self.connections_open += 1
        self.connections_total += 1
        try:
            conn = h11.Connection(h11.SERVER)
            while True:
                got = await _read_request(stream, conn)
                if got is None:
                    return
                request, body = got
                if not await self._respond(stream, request, body):
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def _respond(self, stream: trio.SocketStream, request: h11.Request,
                       body: bytes) -> bool:
        """Answer one request; False when the connection is done (closed or reset)."""
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        self.counts[path] += 1
        self.requests_total += 1
        try:
            req = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            req = {}
        if not isinstance(req, dict):
            req = {}
        model = str(req.get("model") or "faulty-1")
        streaming = req.get("stream") is True
        options = req.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        mode = self.mode
        if mode == "slow" or (mode == "drip" and streaming):
            if not await _sleep_unless_eof(stream, self.first_byte_delay_s):
                return False
            mode = "ok"
        if mode == "status":
            err = orjson.dumps({"error": {
                "message": f"Forced {self.status} by the faulty upstream.",
                "type": "rate_limit_error" if self.status == 429 else "server_error",
                "param": None, "code": "rate_limit_exceeded" if self.status == 429 else None}})
            extra = [(b"retry-after", self.retry_after.encode())] if self.retry_after else []
            await stream.send_all(_head(self.status, "application/json", len(err), extra) + err)
            return True
        if not streaming:
            data = self._completion(model)
            half = data[: len(data) // 2]
            if mode == "ok":
                await stream.send_all(_head(200, "application/json", len(data)) + data)
                return True
            if mode == "drip":
                if not await _sleep_unless_eof(stream, self.first_byte_delay_s):
                    return False
                await stream.send_all(_head(200, "application/json", len(data)) + half)
                if not await _sleep_unless_eof(stream, self.first_byte_delay_s):
                    return False
                await stream.send_all(data[len(half):])
                return True
            if mode == "reset":
                await stream.send_all(_head(200, "application/json", len(data)) + half)
                await _reset(stream)
                return False
            if mode == "stall":
                await stream.send_all(_head(200, "application/json", len(data)) + half)
                await _wait_for_eof(stream)
                return False
            if mode == "garbage":
                await stream.send_all(_head(200, "application/json", len(GARBAGE)) + GARBAGE)
                return True
            if mode == "truncated":
                await stream.send_all(_head(200, "application/json", len(data) + 100) + data)
                await _close(stream)
                return False
            raise ValueError(f"unknown mode {mode!r}")
        events = self._events(model, include_usage)
        head = _head(200, "text/event-stream", None)
        if mode == "ok":
            await stream.send_all(head + b"".join(_chunk(e) for e in events) + b"0\r\n\r\n")
            return True
        sent = b"".join(_chunk(e) for e in events[: self.events])
        nxt = events[self.events] if self.events < len(events) else b""
        if mode == "reset":
            await stream.send_all(head + sent + _chunk(nxt[: len(nxt) // 2]))
            await _reset(stream)
            return False
        if mode == "stall":
            await stream.send_all(head + sent)
            await _wait_for_eof(stream)
            return False
        if mode == "garbage":
            await stream.send_all(head + sent + _chunk(GARBAGE) + b"0\r\n\r\n")
            return True
        if mode == "truncated":
            await stream.send_all(head + sent + _chunk(nxt)[: len(nxt) // 2 + 4])
            await _close(stream)
            return False
        raise ValueError(f"unknown mode {mode!r}")


def _head(status: int, content_type: str, length: int | None,
          extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    reason = {200: b"OK", 429: b"Too Many Requests", 500: b"Internal Server Error",
              502: b"Bad Gateway", 503: b"Service Unavailable"}.get(status, b"Status")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: " + content_type.encode(),
             b"date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()]
    lines.append(b"transfer-encoding: chunked" if length is None
                 else b"content-length: %d" % length)
    lines += [k + b": " + v for k, v in extra or []]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _read_request(stream: trio.SocketStream,
                        conn: h11.Connection) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECV_BYTES))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(body)
        else:  # ConnectionClosed (or PAUSED, which a fresh cycle never is)
            return None


async def _reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _close(stream: trio.SocketStream) -> None:
    with trio.move_on_after(1):
        await stream.send_eof()
    await trio.aclose_forcefully(stream)


async def _wait_for_eof(stream: trio.SocketStream) -> None:
    while True:
        try:
            if not await stream.receive_some(RECV_BYTES):
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _sleep_unless_eof(stream: trio.SocketStream, delay_s: float) -> bool:
    """Sleep; False if the client hung up meanwhile."""
    with trio.move_on_after(delay_s):
        await _wait_for_eof(stream)
        return False
    return True


@asynccontextmanager
async def serve_faulty_upstream(mode: str = "ok", *, host: str = "127.0.0.1", port: int = 0,
                                **knobs: Any) -> AsyncIterator[FaultyUpstream]:
    """Serve a FaultyUpstream in the current trio run; port 0 picks a free one."""
    up = FaultyUpstream(mode, **knobs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, up.serve_connection, port, host=host))
        up.host = host
        up.port = listeners[0].socket.getsockname()[1]
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one fault mode standalone.")
    p.add_argument("--mode", choices=MODES, default="status")
    p.add_argument("--status", type=int, default=500)
    p.add_argument("--events", type=int, default=1)
    p.add_argument("--retry-after", default=None)
    p.add_argument("--first-byte-delay-s", type=float, default=1.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with serve_faulty_upstream(
                    args.mode, host=args.host, port=args.port, events=args.events,
                    status=args.status, retry_after=args.retry_after,
                    first_byte_delay_s=args.first_byte_delay_s) as up:
                print(f"faulty upstream listening on {up.base_url}", flush=True)
                async for _ in signals:
                    return

    trio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
