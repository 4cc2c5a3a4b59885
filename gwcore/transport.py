"""The native upstream transport: a lean keep-alive connection pool on trio + h11.

One ``OriginPool`` per scheme://host:port holds idle connections (a LIFO stack, so
the warmest connection is reused and the coldest ages out) and caps open connections
with a semaphore.  A request takes an idle connection (or opens one: TCP, then TLS
through ``trio.SSLStream`` for https), writes the whole request in one ``send_all``
and reads the answer through h11.  The connection goes back to the pool only when
h11 says both sides finished the exchange cleanly (``our_state`` and
``their_state`` both ``DONE``); anything else (an error, a cancel, an answer left
half-read, ``Connection: close``) closes it.

Timeouts: ``connect_s`` bounds waiting for a pool slot plus TCP connect plus the TLS
handshake; ``read_s`` bounds each wait for bytes (the first byte included).  A whole
answer (the pipeline's ``_try_whole``) comes with deadlines instead: ``first_byte_at``
for the request to go out and the head to arrive, ``end_at`` for the body.  On a plain
TCP connection those are kept by the pools' timer (``NativePools.run``, every
``DEADLINE_TICK_S``): a wait for bytes registers the connection with its deadline, and
the timer wakes a wait whose deadline passed (``trio.lowlevel.notify_closing``), which
then fails with ``UpstreamTimeout``; the connection is not reused.  So a deadline fires
up to a tick late, and an exchange costs no cancel scope, which was the dearest single
thing a request did.  TLS connections, and pools whose timer is not running, keep them
with a cancel scope.  A stream's total is the caller's (a cancel scope per attempt).

Stale connections: a connection idle for ``peek_after_s`` (1 s) or more is checked
before use (a non-blocking ``MSG_PEEK`` sees an EOF the server sent) and dropped if
closed.  One reused sooner is not checked: the peek is a syscall per request, and
servers close idle connections after seconds, not milliseconds.  A server that closes
without announcing it races that check anyway (or closes within the second); so when a
reused connection fails before a single byte of the answer arrived, the request is sent
once more on a fresh connection, whatever its method.  A server that closed before the
request went out never read it, so that resend duplicates nothing.  Decision: a server
that read a whole request and closed without a byte of answer is far rarer than this
race, and the pipeline would resend the request anyway (a connection error is
retryable), only later and counted as a failed attempt of a healthy deployment.

Errors are the gateway's own: ``UpstreamUnavailable`` (cannot connect),
``UpstreamTimeout`` (no bytes within ``read_s``), ``UpstreamError`` (the connection
broke or the answer was not valid HTTP).
"""
from __future__ import annotations

import math
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from gwcore._h11 import h11, split_fields, with_fields
import trio

from gwcore.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RECEIVE_BYTES = 65536
# How often the pools' timer looks for waits past their deadline (NativePools.run).
DEADLINE_TICK_S = 0.02
USER_AGENT = b"gwcore"
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: try a fresh one."""


class _Target:
    """What a URL gives a request, computed once per URL."""
    __slots__ = ("origin", "scheme", "host", "port", "path", "host_header")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnavailable(f"Unsupported upstream URL scheme '{parts.scheme}'.")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default = 443 if parts.scheme == "https" else 80
        try:
            self.port = parts.port or default
        except ValueError as exc:
            raise UpstreamUnavailable("The upstream URL has an invalid port.") from exc
        self.origin = f"{self.scheme}://{self.host}:{self.port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.path = path.encode("ascii", "strict")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default else f"{host}:{self.port}").encode("idna")


class Conn:
    __slots__ = ("stream", "raw", "h11", "idle_since", "reused", "tls")

    def __init__(self, stream: trio.abc.Stream, raw: Any, tls: bool) -> None:
        self.stream = stream
        self.raw = raw                  # the stdlib socket, for the liveness peek
        self.tls = tls
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False

    def alive(self) -> bool:
        """False when the peer closed (or sent something unasked) while we were idle."""
        if self.raw is None:
            return True
        try:
            data = self.raw.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        # TLS 1.3 servers send session tickets after the handshake: bytes waiting on
        # a TLS connection are not a sign of trouble; an EOF is.
        return bool(data) and self.tls

    def close(self) -> None:
        raw = self.raw
        try:
            if raw is not None:
                # RST-free close; the fd goes now, not at garbage collection.
                raw.close()
            else:
                _plain(self.stream).socket.close()
        except OSError:
            pass


def _plain(stream: trio.abc.Stream) -> trio.SocketStream:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream


class OriginPool:
    __slots__ = ("target", "idle", "max_connections", "max_idle", "idle_expiry_s",
                 "peek_after_s", "ssl_context", "open", "waiters", "_handoff", "_woken")

    def __init__(self, target: _Target, *, max_connections: int, max_idle: int,
                 idle_expiry_s: float, ssl_context: ssl.SSLContext | None,
                 peek_after_s: float = 1.0) -> None:
        self.target = target
        self.idle: list[Conn] = []
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_expiry_s = idle_expiry_s
        self.peek_after_s = peek_after_s
        self.ssl_context = ssl_context
        self.open = 0                   # connections open, idle ones included
        self.waiters = trio.lowlevel.ParkingLot()
        # A connection given back while requests wait goes straight to the first of
        # them (FIFO: a request arriving later never takes it first).  _woken counts
        # tasks unparked for a free slot that have not run yet.
        self._handoff: dict[Any, Conn] = {}
        self._woken = 0

    def _pop_idle(self) -> Conn | None:
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            idle_s = now - conn.idle_since
            if idle_s < self.idle_expiry_s and (idle_s < self.peek_after_s or conn.alive()):
                conn.reused = True
                return conn
            self.discard(conn)
        return None

    async def acquire(self, connect_s: float, fresh: bool = False) -> Conn:
        """An idle live connection, or a new one; when ``max_connections`` are open
        and busy, wait (within ``connect_s``, first come first served) for one to come
        back or close."""
        queued = bool(self.waiters) or self._woken > 0
        if not fresh and not queued:
            conn = self._pop_idle()
            if conn is not None:
                return conn
        with trio.move_on_after(connect_s):
            while True:
                if not queued:
                    if not fresh:
                        conn = self._pop_idle()
                        if conn is not None:
                            return conn
                    elif self.open >= self.max_connections and self.idle:
                        self.discard(self.idle.pop(0))  # make room: the coldest goes
                    if self.open < self.max_connections:
                        self.open += 1
                        try:
                            return await self._connect()
                        except BaseException:
                            self.open -= 1
                            self._wake_one()
                            raise
                queued = False
                task = trio.lowlevel.current_task()
                try:
                    await self.waiters.park()
                except BaseException:
                    handed = self._handoff.pop(task, None)
                    if handed is not None:
                        self._give(handed)  # not ours after all: the next one's
                    raise
                handed = self._handoff.pop(task, None)
                if handed is not None:
                    return handed
                self._woken -= 1  # woken for a free slot (or idle room): try again
        if self.open >= self.max_connections:
            raise UpstreamUnavailable(
                f"All {self.max_connections} connections to the upstream stayed busy "
                "for the connect timeout (server.upstream_max_connections).")
        raise UpstreamUnavailable("Connecting to the upstream timed out.")

    def _wake_one(self) -> None:
        """A slot came free: the first waiter may take it."""
        if self.waiters:
            self._woken += 1
            self.waiters.unpark()

    def _give(self, conn: Conn) -> None:
        """A reusable connection: to the first waiter, else onto the idle stack."""
        if self.waiters:
            for task in self.waiters.unpark():
                self._handoff[task] = conn
            return
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            self.discard(conn)

    async def _connect(self) -> Conn:
        t = self.target
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(t.host, t.port)
        except OSError as exc:
            raise UpstreamUnavailable("The upstream could not be reached.") from exc
        sock = stream.socket
        raw = getattr(sock, "_sock", None)
        if t.scheme == "https":
            assert self.ssl_context is not None
            ssl_stream = trio.SSLStream(stream, self.ssl_context, server_hostname=t.host,
                                        https_compatible=True)
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                await trio.aclose_forcefully(stream)
                raise UpstreamUnavailable(
                    f"The TLS handshake with the upstream failed: {exc}.") from exc
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return Conn(ssl_stream, raw, True)
        return Conn(stream, raw, False)

    def release(self, conn: Conn) -> None:
        """Back to the idle stack when h11 says the exchange ended cleanly; else close."""
        h = conn.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                self.discard(conn)
                return
            conn.idle_since = time.monotonic()
            self._give(conn)
            return
        self.discard(conn)

    def discard(self, conn: Conn) -> None:
        conn.close()
        self.open -= 1
        self._wake_one()

    def close_idle(self) -> None:
        while self.idle:
            self.discard(self.idle.pop())


class NativeResponse:
    """The answer of one exchange; ``Exchange.__aexit__`` releases its connection."""
    __slots__ = ("status", "_raw_headers", "_conn", "_read_s", "_end_at", "_pools",
                 "_ended", "_next")

    def __init__(self, status: int, raw_headers: Any, conn: Conn, read_s: float,
                 end_at: float, pools: "NativePools") -> None:
        self.status = status
        self._raw_headers = raw_headers
        self._conn = conn
        self._read_s = read_s
        self._end_at = end_at  # the body's deadline (trio time); inf: read_s per wait
        self._pools = pools
        self._ended = False
        self._next: Any = None  # an event (or error) at_end read ahead

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Lower-case (name, value) pairs; decoded only when asked (errors need them)."""
        return [(name.decode("latin-1"), value.decode("latin-1"))
                for _, name, value in self._raw_headers._full_items]

    def _ahead(self) -> Any:
        """The next event if h11 has it without I/O (kept for ``_event``; an error is
        kept too, and raised there), else None."""
        if self._next is None:
            try:
                event = self._conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                event = exc
            if event is h11.NEED_DATA:
                return None
            self._next = event
        return self._next

    def at_end(self) -> bool:
        """True when the end of the body is already read: the relay then sends its
        last events together with the stream's end.  Reads ahead without I/O."""
        if not self._ended and type(self._ahead()) is h11.EndOfMessage:
            self._next = None
            self._ended = True
        return self._ended

    async def _event(self) -> Any:
        ahead = self._next
        if ahead is not None:
            self._next = None
            if isinstance(ahead, h11.RemoteProtocolError):
                raise UpstreamError(f"The upstream response broke off: {ahead}.") from ahead
            return ahead
        conn = self._conn
        h = conn.h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"The upstream response broke off: {exc}.") from exc
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(await self._pools.receive(conn, self._read_s, self._end_at))

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while not self._ended:
            event = await self._event()
            if type(event) is h11.Data:
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                self._ended = True
            elif type(event) is h11.ConnectionClosed:
                raise UpstreamError("The upstream closed the connection mid-response.")
        return b"".join(parts)

    async def chunks(self, first_alone: bool = False) -> AsyncIterator[bytes]:
        """The body as it arrives.  Close the iterator (``aclose``) when done with it.

        Every piece of body already read comes as one chunk: an SSE stream is sent one
        event per HTTP chunk, and relaying what arrived together in one go saves a
        write to the client per event.  With ``first_alone`` the first piece comes on
        its own (its event can go out before the rest is decoded)."""
        alone = first_alone
        while not self._ended:
            event = await self._event()
            if type(event) is h11.Data:
                data = event.data
                parts = None
                while not alone and type(ahead := self._ahead()) is h11.Data:
                    self._next = None
                    if parts is None:
                        parts = [data]
                    parts.append(ahead.data)
                alone = False
                yield data if parts is None else b"".join(parts)
            elif type(event) is h11.EndOfMessage:
                self._ended = True
            elif type(event) is h11.ConnectionClosed:
                raise UpstreamError("The upstream stream broke off.")


async def _receive(conn: Conn, read_s: float) -> bytes:
    """The next bytes from the upstream (b"" at EOF), within ``read_s``."""
    with trio.move_on_after(read_s):
        return await _read(conn)
    raise UpstreamTimeout()


async def _read(conn: Conn) -> bytes:
    """The next bytes from the upstream (b"" at EOF), however long they take.

    Plain TCP waits for readability first and then reads the socket directly: the
    answer to a request just sent is never there yet, so trying the read first (what
    ``receive_some`` does) would only cost a failed syscall.
    """
    raw = conn.raw
    try:
        if raw is None or conn.tls:
            return await conn.stream.receive_some(RECEIVE_BYTES)
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                return raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"The upstream connection broke: {exc}.") from exc


async def _send(conn: Conn, data: bytes, until: float) -> None:
    """The whole of ``data``: straight into the socket buffer when it fits (a request
    nearly always does), else through the stream, which waits for room (by ``until``,
    trio time, else UpstreamTimeout)."""
    raw = conn.raw
    if raw is not None and not conn.tls:
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    with trio.move_on_at(until):
        await conn.stream.send_all(data)
        return
    raise UpstreamTimeout()


class Exchange:
    """``async with pool.exchange(...) as response``: one request and its answer."""
    __slots__ = ("pools", "method", "url", "headers", "body", "connect_s", "read_s",
                 "first_byte_at", "end_at", "_target", "_pool", "_conn")

    def __init__(self, pools: "NativePools", method: str, url: str,
                 headers: list[tuple[str, str]], body: bytes, connect_s: float,
                 read_s: float, first_byte_at: float = math.inf,
                 end_at: float = math.inf) -> None:
        self.pools = pools
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.connect_s = connect_s
        self.read_s = read_s
        self.first_byte_at = first_byte_at
        self.end_at = end_at
        self._target: _Target | None = None
        self._pool: OriginPool | None = None
        self._conn: Conn | None = None

    async def __aenter__(self) -> NativeResponse:
        self._target, pool = self.pools.resolve(self.url)
        self._pool = pool
        conn = await pool.acquire(self.connect_s)
        try:
            try:
                return await self._send(pool, conn)
            except _Stale:
                self.pools.stale_resends += 1
                pool.discard(conn)
                conn = None  # type: ignore[assignment]
                conn = await pool.acquire(self.connect_s, fresh=True)
                return await self._send(pool, conn)
        except BaseException:
            if conn is not None:
                pool.discard(conn)
            raise

    async def _send(self, pool: OriginPool, conn: Conn) -> NativeResponse:
        self._conn = conn
        h = conn.h11
        t = self._target
        assert t is not None
        body = self.body
        try:
            framing, block = self.pools.fields(t, self.headers)
            if body or self.method not in IDEMPOTENT:
                framing = framing + [(b"content-length", b"%d" % len(body))]
            data = with_fields(h.send(h11.Request(method=self.method, target=t.path,
                                                  headers=framing)), block)
            if body:
                data += h.send(h11.Data(data=body))
            data += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"The upstream request could not be sent: {exc}.") from exc
        try:
            await _send(conn, data, self.first_byte_at)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if conn.reused:
                raise _Stale(exc) from exc
            raise UpstreamError(f"The upstream connection broke: {exc}.") from exc
        got_bytes = False
        event: Any = h11.NEED_DATA  # no answer before the request: skip asking h11
        asked = False
        while True:
            try:
                if asked:
                    event = h.next_event()
                asked = True
            except h11.RemoteProtocolError as exc:
                if conn.reused and not got_bytes and h.their_state is h11.ERROR \
                        and not h.trailing_data[0]:
                    raise _Stale(exc) from exc
                raise UpstreamError(f"The upstream sent an invalid response: {exc}.") \
                    from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self.pools.receive(conn, self.read_s, self.first_byte_at)
                except UpstreamTimeout:
                    raise  # the upstream is slow, not gone: sending again would repeat it
                except UpstreamError as exc:
                    if conn.reused and not got_bytes:
                        raise _Stale(exc) from exc
                    raise
                if data:
                    got_bytes = True
                elif conn.reused and not got_bytes:
                    raise _Stale(EOFError("connection closed"))
                h.receive_data(data)
                continue
            if type(event) is h11.Response:
                return NativeResponse(event.status_code, event.headers, conn, self.read_s,
                                      self.end_at, self.pools)
            if type(event) is h11.ConnectionClosed:
                raise UpstreamError("The upstream closed the connection without answering.")
            # InformationalResponse (100 Continue and friends): keep reading.

    async def __aexit__(self, *exc: object) -> None:
        pool, conn = self._pool, self._conn
        self._conn = None
        if pool is not None and conn is not None:
            pool.release(conn)


class NativePools:
    """Every origin's pool; closed with the app."""

    def __init__(self, *, max_connections: int = 1000, max_idle: int = 200,
                 idle_expiry_s: float = 30.0, peek_after_s: float = 1.0) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        # 30 s: below the idle timeout of common servers and balancers (nginx 75 s,
        # AWS ALB 60 s), so we rarely find a connection the far side already closed.
        self.idle_expiry_s = idle_expiry_s
        # 1 s: below the shortest idle timeouts in use (gunicorn's 2 s, uvicorn's and
        # Node's 5 s), so a connection the server timed out is still seen before use.
        self.peek_after_s = peek_after_s
        self.stale_resends = 0  # requests sent again after a reused connection failed
        # Plain connections waited on under a deadline, and it (see the module docstring).
        self._waiting: dict[Conn, float] = {}
        self._timer = False  # run() is keeping those deadlines
        self._parked: trio.Event | None = None  # run() waits for a first deadline
        self._pools: dict[str, OriginPool] = {}
        self._targets: dict[str, tuple[_Target, OriginPool]] = {}
        self._fields: dict[tuple[Any, ...], tuple[list[tuple[bytes, bytes]], bytes]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    def resolve(self, url: str) -> tuple[_Target, OriginPool]:
        hit = self._targets.get(url)
        if hit is not None:
            return hit
        target = _Target(url)
        pool = self._pools.get(target.origin)
        if pool is None:
            pool = OriginPool(target, max_connections=self.max_connections,
                              max_idle=self.max_idle, idle_expiry_s=self.idle_expiry_s,
                              peek_after_s=self.peek_after_s,
                              ssl_context=self._ssl_context() if target.scheme == "https"
                              else None)
            self._pools[target.origin] = pool
        if len(self._targets) > 4096:
            self._targets.clear()
        hit = self._targets[url] = (target, pool)
        return hit

    def fields(self, target: "_Target", headers: list[tuple[Any, Any]]
               ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The request's fields for h11 and its other lines (``split_fields``), with
        Host; remembered, since a deployment sends the same ones every time."""
        key = (target.host_header, tuple(headers))
        hit = self._fields.get(key)
        if hit is None:
            encoded = [(b"host", target.host_header)]
            try:
                encoded += [(k if type(k) is bytes else k.encode("ascii"),
                             v if type(v) is bytes else v.encode("ascii")) for k, v in headers]
            except UnicodeEncodeError as exc:
                raise h11.LocalProtocolError(f"Illegal header: {exc}") from exc
            hit = split_fields(encoded)
            if len(self._fields) >= 1024:
                self._fields.clear()
            self._fields[key] = hit
        return hit

    def exchange(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                 connect_s: float, read_s: float, first_byte_at: float = math.inf,
                 end_at: float = math.inf) -> Exchange:
        return Exchange(self, method, url, headers, body, connect_s, read_s,
                        first_byte_at, end_at)

    async def receive(self, conn: Conn, read_s: float, until: float) -> bytes:
        """The next bytes from the upstream (b"" at EOF): by ``until`` (trio time), or
        when that is infinite, within ``read_s``; else UpstreamTimeout."""
        if until == math.inf:
            return await _receive(conn, read_s)
        if conn.raw is None or conn.tls or not self._timer:
            with trio.move_on_at(until):
                return await _read(conn)
            raise UpstreamTimeout()
        if self._parked is not None:
            self._parked.set()
            self._parked = None
        self._waiting[conn] = until
        try:
            return await _read(conn)
        except UpstreamError:
            if trio.current_time() >= until:  # run() woke the wait: the deadline passed
                raise UpstreamTimeout() from None
            raise
        finally:
            del self._waiting[conn]

    async def run(self) -> None:
        """The timer of the deadlines ``receive`` registers (started with the app).  It
        ticks while some wait has a deadline; when none has at a tick, it sleeps until
        the next one comes (an idle gateway does not wake for it)."""
        self._timer = True
        try:
            while True:
                waiting = self._waiting
                if not waiting:
                    self._parked = trio.Event()
                    await self._parked.wait()
                await trio.sleep(DEADLINE_TICK_S)
                if waiting:
                    now = trio.current_time()
                    for conn in [c for c, until in waiting.items() if until <= now]:
                        trio.lowlevel.notify_closing(conn.raw)
        finally:
            self._timer = False
            self._parked = None

    def statistics(self) -> dict[str, int]:
        return {"upstream_connections": sum(p.open for p in self._pools.values()),
                "upstream_connections_idle": sum(len(p.idle) for p in self._pools.values()),
                "upstream_stale_resends_total": self.stale_resends}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()
