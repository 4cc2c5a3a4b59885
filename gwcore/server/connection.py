"""One trio task per client connection: read a request, run the handler, repeat.

How this works: ``serve_connection`` loops over requests on one keep-alive connection,
inside one cancel scope for the whole connection (``Connection.scope``).  The read
phases set a deadline on the connection: the keep-alive idle timeout while nothing of
the next request has arrived, the header timeout once its first byte is in (from the
accept, for the first request), and the body timeout once the head is complete.  The
listener's timer (one task for all connections, ``Server._expire_loop``) cancels a
connection whose deadline passed, within a tick (a tenth of the shortest timeout, at
most 1 s): a cancel scope with a deadline per request cost more than the rest of the
read.  A client that misses a deadline is dropped; it holds only its own task.

No task watches the client while a whole answer is prepared: the next read finds an
EOF or a reset.  A stream asks for a watcher (``Responder.watch``); the listener's
timer starts it if the stream is still going ``WATCH_DELAY_S`` (50 ms) later, so a
stream from a fast upstream costs no task.  The watcher reads the socket: it feeds
pipelined bytes to h11 (which buffers them for the next cycle), writes the ``: ping``
comments while the first event is awaited (synchronously, so never in the middle of
another write), and on EOF while the stream is under way cancels the connection's
scope, handler included: a client that goes away mid-stream cancels the upstream
request at once, even while no chunk is being written (``send_all`` would only notice
on the next write).  Any other EOF is not taken as the client leaving: one that came
before the response started (read by the watcher then, or already queued when the
watcher started: ``_peer_shut_writing``), during a whole (unstreamed) answer, or after
further pipelined requests (which the client will want answered).  A client may
half-close (shut down its sending side after its requests, as ``nc -N`` and some
HTTP/1.0 scripts do) and still read the answers, pipelined ones included, and a socket
cannot tell that from a full close.  The answer is sent; if the client did close fully,
the write fails (at the latest on the second write, after its reset) and the connection
ends then.  The price: a client that vanishes while a non-streamed answer is awaited
(or in a stream's first 50 ms) leaves that upstream request running to its end (and it
is accounted).

    phase          deadline                      on expiry / EOF
    -----          --------                      ---------------
    idle           keepalive_timeout_s           close quietly
    head           header_timeout_s              close (slow client dropped)
    body           body_timeout_s                close
    handler        none (the handler's own)      EOF during a stream: handler
                                                 cancelled, close; other EOF: answer
                                                 (and pipelined requests), then close
    writing        send_timeout_s per 64 KiB     close (slow reader dropped)
    draining       -                             idle connections close at once;
                                                 in-flight ones finish, then close
"""
from __future__ import annotations

import logging
import math
import select
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import trio

from gwcore.server.h1 import (CLOSED, END_OF_BODY, NEED_DATA, PAUSED, BodyChunk,
                              H1Connection, ProtocolError, RequestHead)

log = logging.getLogger("gwcore.server")

RECEIVE_BYTES = 64 * 1024
SEND_PIECE_BYTES = 64 * 1024
# A stream still going this long after it asked for a watcher gets one (see
# Responder.watch); also the listener's timer tick.
WATCH_DELAY_S = 0.05


@dataclass(slots=True)
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    # 60 s: nginx's send_timeout.  A write that makes no progress for this long (the
    # client stopped reading) drops the client, so a slow reader cannot hold its
    # connection slot and upstream request forever.  Writes go out in SEND_PIECE_BYTES
    # pieces, so a slow but reading client is never cut.
    send_timeout_s: float = 60.0


class Request:
    __slots__ = ("method", "target", "path", "query", "headers", "body", "client",
                 "started_at", "_header_map")

    def __init__(self, head: RequestHead, body: bytes, client: str) -> None:
        self.method = head.method.decode("ascii", "replace")
        self.target = head.target.decode("ascii", "replace")
        path, _, query = self.target.partition("?")
        self.path = path
        self.query = query
        self.headers = head.headers
        self.body = body
        self.client = client
        self.started_at = time.perf_counter()
        self._header_map: dict[bytes, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The value of a header (lowercase name); the last one wins when repeated."""
        m = self._header_map
        if m is None:
            m = self._header_map = dict(self.headers)
        return m.get(name)


class ConnectionState(Protocol):
    draining: bool
    handling: int  # requests being handled by this worker, all connections

    def response_headers(self) -> list[tuple[bytes, bytes]]: ...

    def watch_later(self, responder: "Responder") -> None: ...

    def unwatch(self, responder: "Responder") -> None: ...


Handler = Callable[[Request, "Responder"], Awaitable[None]]
ErrorRenderer = Callable[[int, str], tuple[list[tuple[bytes, bytes]], bytes]]


class Responder:
    """Writes one response: whole (``send``) or streamed (``start_stream`` ...).

    A stream may first ask for a watcher (``watch``): a task that reads the client
    while the answer is prepared and streamed, to notice it leaving, and that sends
    ``: ping`` comments while the stream waits for its first event (the first ping
    commits the 200 head).  Pings are written synchronously, so they never interleave
    with the handler's writes.
    """

    __slots__ = ("_stream", "_raw", "_h1", "_state", "status", "bytes_sent",
                 "send_timeout_s", "eof_at_start", "streaming", "write_failed", "peer_gone",
                 "_conn", "_nursery", "_watcher", "_ping", "_backlog", "_watch_since",
                 "_done")

    def __init__(self, stream: trio.abc.Stream, h1: H1Connection, state: ConnectionState,
                 send_timeout_s: float = 60.0, nursery: trio.Nursery | None = None,
                 conn: "Connection | None" = None) -> None:
        self._stream = stream
        self._raw = getattr(getattr(stream, "socket", None), "_sock", None)
        self._h1 = h1
        self._state = state
        self._nursery = nursery
        # The watcher's cancel scope and the event it sets when it has stopped reading.
        self._watcher: tuple[trio.CancelScope, trio.Event] | None = None
        # While pinging: (the head's headers a first ping commits, the ping's bytes,
        # the interval).
        self._ping: tuple[list[tuple[bytes, bytes]], bytes, float] | None = None
        self._watch_since: float | None = None  # when watch() was asked
        self._done = False  # the handler has ended: no watcher may start
        # Bytes a synchronous ping could not write at once; the next write sends them first.
        self._backlog = b""
        self._conn = conn
        self.peer_gone = False
        self.status = 0
        self.bytes_sent = 0
        self.send_timeout_s = send_timeout_s
        # The client had already shut its sending side when the response started: an
        # EOF the watcher reads later is that half-close, not the client leaving.
        self.eof_at_start = False
        self.streaming = False
        # A write failed (the client is gone, or read nothing for send_timeout_s): h11
        # has framed the whole answer, but the socket did not take it, so the connection
        # must close whatever the handler made of the exception.
        self.write_failed = False

    def _send_nowait(self, data: bytes) -> bytes:
        """What of ``data`` the socket did not take at once (all of it without a socket)."""
        raw = self._raw
        if raw is None:
            return data
        try:
            sent = raw.send(data)
        except BlockingIOError:
            return data
        except OSError as exc:
            self.write_failed = True
            raise trio.BrokenResourceError(f"the client connection broke: {exc}") from exc
        return data[sent:] if sent < len(data) else b""

    async def _write(self, data: bytes) -> None:
        """``send_all`` in pieces, each within ``send_timeout_s``; a client that stops
        reading gets BrokenResourceError, as one that closed does.

        Fast path: straight into the socket buffer when it has room for all of it (an
        answer or an event nearly always fits), with no cancel scope and no wait.
        """
        if self._backlog:
            data, self._backlog = self._backlog + data, b""
        data = self._send_nowait(data)
        if not data:
            return
        view = memoryview(data)
        try:
            for start in range(0, len(view), SEND_PIECE_BYTES):
                with trio.move_on_after(self.send_timeout_s) as scope:
                    await self._stream.send_all(view[start:start + SEND_PIECE_BYTES])
                if scope.cancelled_caught:
                    raise trio.BrokenResourceError(
                        f"the client read nothing for {self.send_timeout_s} s")
        except BaseException:  # broken, closed, or cancelled half-way: not reusable
            self.write_failed = True
            raise

    @property
    def alone(self) -> bool:
        """True when this is the only request the worker is handling.  Nothing else
        waits for the CPU then, so a stream's first event is worth a write of its own;
        under load, events that arrived together go out together (fewer writes, more
        streams per core), as TCP autocorking does."""
        return self._state.handling <= 1

    @property
    def started(self) -> bool:
        return self.status != 0

    def _headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = self._state.response_headers() + headers
        if self._state.draining:
            out.append((b"connection", b"close"))
        return out

    async def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        data = self._h1.response(status, self._headers(headers), body)
        self.bytes_sent += len(body)
        await self._write(data)

    async def start_stream(self, status: int, headers: list[tuple[bytes, bytes]],
                           first: bytes = b"", *, end: bool = False) -> None:
        """The head, and the stream's ``first`` bytes in the same write (and with
        ``end``, its end too: a stream whose every event was already at hand)."""
        self.status = status
        self.streaming = True
        if self._watcher is not None and not end:
            self.eof_at_start = _peer_shut_writing(self._stream)
        data = self._h1.response_head(status, self._headers(headers))
        if first:
            self.bytes_sent += len(first)
            data += self._h1.response_body(first)
        if end:
            data += self._h1.response_end()
        await self._write(data)

    def watch(self, ping_s: float = 0.0, head: list[tuple[bytes, bytes]] | None = None,
              ping: bytes = b"") -> None:
        """Have a watcher read the client until the handler ends and, every ``ping_s``
        until ``stop_pings``, write ``ping`` (first with a 200 head with ``head``'s
        headers).

        The watcher task starts only if the handler is still at it ``WATCH_DELAY_S``
        later (the listener's timer starts it: ``start_watcher``): most streams from a
        fast upstream are over by then, and a task per stream would cost them a good
        part of their time.  The pings keep their times all the same.
        """
        if self._nursery is None or self._watch_since is not None:
            return
        self._watch_since = trio.current_time()
        if ping_s > 0 and ping and self._raw is not None:
            self._ping = (head or [], ping, ping_s)
        self._state.watch_later(self)

    def start_watcher(self) -> None:
        """Start the watcher task (the listener's timer calls this)."""
        if self._nursery is None or self._watcher is not None or self._done:
            return
        if self.streaming:
            # An EOF already queued: the client half-closed (or left: then a write
            # fails later); only an EOF that comes from now on cancels the handler.
            self.eof_at_start = _peer_shut_writing(self._stream)
        watcher = (trio.CancelScope(), trio.Event())
        first_ping_at = self._watch_since + self._ping[2] if self._ping is not None \
            else math.inf
        try:
            self._nursery.start_soon(_watch, self._stream, self._raw, self._h1, self,
                                     first_ping_at, *watcher)
        except RuntimeError:  # the connection's nursery has closed: nothing to watch
            return
        self._watcher = watcher

    def stop_pings(self) -> None:
        self._ping = None

    def _send_ping(self) -> None:
        if self._ping is None or self.write_failed:
            return
        head, ping, _ = self._ping
        data = b""
        if not self.status:
            self.status = 200
            self.streaming = True
            data = self._h1.response_head(200, self._headers(head))
        data += self._h1.response_body(ping)
        self.bytes_sent += len(ping)
        if self._backlog:
            data, self._backlog = self._backlog + data, b""
        self._backlog = self._send_nowait(data)

    def client_gone(self) -> None:
        """The client left mid-stream: the handler's work is wasted, cancel it."""
        self.peer_gone = True
        if self._conn is not None:
            self._conn.scope.cancel()

    def forget_watch(self) -> None:
        """The handler has ended: no watcher may start from now on."""
        self._ping = None
        self._done = True
        if self._watch_since is not None:
            self._state.unwatch(self)

    async def stop_watching(self) -> None:
        """Stop the watcher (if any) and wait until it no longer reads."""
        self.forget_watch()
        if self._watcher is not None:
            scope, done = self._watcher
            scope.cancel()
            await done.wait()

    async def send_chunk(self, data: bytes) -> None:
        if data:
            self.bytes_sent += len(data)
            await self._write(self._h1.response_body(data))

    async def end_stream(self, last: bytes = b"") -> None:
        """The stream's ``last`` bytes and its end, in one write."""
        data = b""
        if last:
            self.bytes_sent += len(last)
            data = self._h1.response_body(last)
        await self._write(data + self._h1.response_end())


class Connection:
    """One connection's state, as the connection task and the listener share it.

    ``scope`` wraps the whole connection: cancelling it ends the connection (the
    listener's timer does so when ``deadline`` passes, a drain does so for an idle
    connection, and a stream's watcher does so when the client leaves).  The read
    phases set ``deadline``; while the handler runs it is infinite (the handler keeps
    its own time), so the timer never cuts an answer short.
    """

    __slots__ = ("scope", "deadline", "idle", "busy")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.deadline = math.inf
        self.idle = False       # waiting for a next request of which no byte has come
        self.busy = False       # a handler is running


async def serve_connection(stream: trio.SocketStream, handler: Handler, limits: ServerLimits,
                           state: ConnectionState, conn: Connection,
                           render_error: ErrorRenderer) -> None:
    h1 = H1Connection(max_header_bytes=limits.max_header_bytes,
                      max_body_bytes=limits.max_body_bytes)
    client = _peer(stream)
    try:
        with conn.scope:
            async with trio.open_nursery() as nursery:  # for the stream watchers
                await _serve_requests(stream, handler, limits, state, conn, render_error,
                                      h1, client, nursery)
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_requests(stream: trio.SocketStream, handler: Handler, limits: ServerLimits,
                          state: ConnectionState, conn: Connection,
                          render_error: ErrorRenderer, h1: H1Connection, client: str,
                          nursery: trio.Nursery) -> None:
    raw = getattr(getattr(stream, "socket", None), "_sock", None)
    first = True
    try:
        while True:
            if state.draining and h1.idle:
                return
            try:
                got = await _read_request(stream, raw, h1, limits, conn, first)
            except ProtocolError as exc:
                headers, body = render_error(exc.status, exc.message)
                data = h1.error_response(exc.status, state.response_headers() + headers,
                                         body)
                if data:
                    await _lingering_close(stream, data)
                return
            if got is None:
                return
            first = False
            head, body = got
            request = Request(head, body, client)
            responder = Responder(stream, h1, state, limits.send_timeout_s, nursery, conn)
            conn.busy = True
            state.handling += 1
            try:
                finished = await _run_handler(h1, handler, request, responder, render_error)
            finally:
                conn.busy = False
                state.handling -= 1
            if not finished:
                return
            if not h1.start_next_cycle():
                # The answer ends the connection (HTTP/1.0, "connection: close"), maybe
                # with pipelined input still unread: close like after an error answer.
                await _lingering_close(stream, b"")
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client left: nothing to answer, nothing to report


async def _receive(stream: trio.SocketStream, raw: Any, wait_first: bool) -> bytes:
    """The next bytes from the client (b"" at EOF).

    A plain socket is read directly: after a wait for readability when no data is
    expected yet (``wait_first``: the client has yet to read our answer and send
    again), else tried first.  This skips trio's socket wrapper (two checkpoints and a
    context manager per call) on the hot path.
    """
    if raw is None:
        return await stream.receive_some(RECEIVE_BYTES)
    if wait_first:
        await trio.lowlevel.wait_readable(raw)
    while True:
        try:
            return raw.recv(RECEIVE_BYTES)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(raw)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def _read_request(stream: trio.SocketStream, raw: Any, h1: H1Connection,
                        limits: ServerLimits, conn: Connection,
                        first: bool) -> tuple[RequestHead, bytes] | None:
    """The next request's head and body, or None when the connection should close.

    A phase that outlasts its deadline is cut by the listener's timer (``conn.scope``).
    """
    idle = h1.idle
    in_head = first or not idle
    # Nothing buffered: h11 would only say NEED_DATA (a call that costs microseconds).
    empty = first or idle
    # The phase's timeout, set as the deadline when the phase first waits for bytes: a
    # request that arrives whole reads the clock once.
    timeout_s: float | None = limits.header_timeout_s if in_head else limits.keepalive_timeout_s
    conn.idle = not in_head
    head: RequestHead | None = None
    chunks: list[bytes] = []
    try:
        while True:
            if empty:
                event, empty = NEED_DATA, False
            else:
                event = h1.next_event()
            if event is NEED_DATA:
                if timeout_s is not None:
                    conn.deadline = trio.current_time() + timeout_s
                    timeout_s = None
                data = await _receive(stream, raw, wait_first=not in_head)
                if not data:
                    if head is None and h1.idle:
                        return None
                    h1.receive_data(b"")
                    continue
                if not in_head:
                    # First byte of this request: from now on the header timeout runs,
                    # and a drain no longer counts this connection as idle.
                    in_head = True
                    conn.idle = False
                    timeout_s = limits.header_timeout_s
                h1.receive_data(data)
            elif type(event) is RequestHead:
                head = event
                timeout_s = limits.body_timeout_s
            elif type(event) is BodyChunk:
                chunks.append(event.data)  # type: ignore[union-attr]
            elif event is END_OF_BODY:
                assert head is not None
                return head, chunks[0] if len(chunks) == 1 else b"".join(chunks)
            else:  # CLOSED or PAUSED; h11 emits nothing else to a server
                return None
    finally:
        conn.deadline = math.inf
        conn.idle = False


# After an error answer the client may still be sending (a body we refused, a long
# head).  Closing a socket with unread input makes the kernel send a reset, which can
# destroy the answer before the client reads it; so, like nginx's lingering_close, shut
# our side and read away what still comes, within bounds.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024


async def _lingering_close(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(LINGER_S):
        await stream.send_all(data)
        await stream.send_eof()
        drained = 0
        while drained < LINGER_BYTES:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            drained += len(chunk)


async def _run_handler(h1: H1Connection, handler: Handler, request: Request,
                       responder: Responder, render_error: ErrorRenderer) -> bool:
    """Run the handler; True if the response completed.

    No task watches the client while a whole answer is being prepared (a task and a
    nursery per request cost more than the rest of the server's work); a stream starts
    one (``Responder.start_stream``), which is stopped here before the next cycle.  A
    client that leaves mid-stream cancels the connection's scope, handler included.
    """
    try:
        await handler(request, responder)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        responder.peer_gone = True
    except Exception:
        log.exception("handler failed on %s %s", request.method, request.path)
        if not responder.started and not responder.peer_gone:
            headers, body = render_error(500, "Internal error in the gateway.")
            headers = headers + [(b"connection", b"close")]
            await responder.send(500, headers, body)
        await responder.stop_watching()
        return False
    finally:
        responder.forget_watch()  # also when cancelled: no watcher may start later
    await responder.stop_watching()
    return not responder.peer_gone and not responder.write_failed and h1.response_done


async def _watch(stream: trio.SocketStream, raw: Any, h1: H1Connection,
                 responder: Responder, ping_at: float, scope: trio.CancelScope,
                 done: trio.Event) -> None:
    """Read what the client sends while a stream is prepared and goes out; ping.

    Pipelined requests are buffered by h11.  A reset, or an EOF once the stream has
    started (see the module docstring), means the client is gone and the handler's work
    is wasted: the handler is cancelled.  An EOF before the stream starts may be a
    half-close: stop reading, let the answer go out.
    """
    try:
        with scope:
            while h1.buffered_bytes <= h1.max_header_bytes + h1.max_body_bytes:
                try:
                    if responder._ping is not None:
                        data = None
                        with trio.move_on_at(ping_at):
                            data = await _receive(stream, raw, wait_first=True)
                        if data is None:
                            responder._send_ping()
                            if responder._ping is not None:
                                ping_at = max(ping_at + responder._ping[2],
                                              trio.current_time())
                            continue
                    else:
                        data = await _receive(stream, raw, wait_first=True)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    responder.client_gone()
                    return
                if not data:
                    # Pipelined requests already read (they came before the EOF) say
                    # the client means to read on: a half-close, not a departure.
                    if responder.streaming and not responder.eof_at_start \
                            and not h1.buffered_bytes:
                        responder.client_gone()
                    return
                h1.receive_data(data)
    finally:
        done.set()


_POLL_EOF = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def _peer_shut_writing(stream: trio.abc.Stream) -> bool:
    """True when the client's FIN (or a reset) is already queued on the socket.

    A synchronous, zero-timeout poll (POLLRDHUP is Linux's "peer shut down writing"):
    it tells a client that half-closed right after its request from one that leaves
    while its response is being written.  Other streams (memory streams in tests): False.
    """
    try:
        fd = stream.socket.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, _POLL_EOF)
    return bool(poller.poll(0))


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except (OSError, AttributeError):
        return ""
    return addr[0] if isinstance(addr, tuple) else str(addr)
