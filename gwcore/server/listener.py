"""Listeners, the connection cap, and the graceful drain.

How this works: ``Server.serve`` runs one accept loop per listening socket and one task
per connection, all in one nursery.  The accept loop takes a slot from a semaphore
before each accept, so at ``max_connections`` it stops accepting and new clients wait
in the kernel's backlog instead of costing memory here.  ``drain`` (SIGTERM/SIGINT)
closes the listening sockets (new connections are refused), closes connections that
sit idle between requests, lets in-flight requests and streams finish, and after
``grace_s`` cancels whatever is left.
"""
from __future__ import annotations

import errno
import logging
import socket as stdsocket
import time
from email.utils import formatdate

import trio

from gwcore.server.connection import (WATCH_DELAY_S, Connection, ErrorRenderer, Handler,
                                      Responder, ServerLimits, serve_connection)

log = logging.getLogger("gwcore.server")

# Accept errors that mean "out of a resource for now": wait and retry, as trio's own
# serve_listeners does.
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Server:
    def __init__(self, handler: Handler, limits: ServerLimits, *, max_connections: int,
                 render_error: ErrorRenderer) -> None:
        self.handler = handler
        self.limits = limits
        self.render_error = render_error
        self.max_connections = max_connections
        self.draining = False
        self.handling = 0
        self.connections: set[Connection] = set()
        self.accepted_total = 0
        self._slots = trio.Semaphore(max_connections)
        self._accept_scope = trio.CancelScope()
        self._listeners: list[trio.SocketListener] = []
        self._date = b""
        self._date_at = 0
        self._all_closed = trio.Event()
        self._common: list[tuple[bytes, bytes]] = []
        # Streams that asked for a watcher, and since when (Responder.watch).
        self._watch_later: dict[Responder, float] = {}
        # Set by watch_later while the timer sleeps with no stream to watch.
        self._watch_wakeup: trio.Event | None = None

    # ConnectionState --------------------------------------------------------------
    def response_headers(self) -> list[tuple[bytes, bytes]]:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = formatdate(now, usegmt=True).encode()
            self._common = [(b"date", self._date), (b"server", b"gwcore")]
        return list(self._common)

    def statistics(self) -> dict[str, int | bool]:
        busy = sum(1 for c in self.connections if c.busy)
        return {"connections_open": len(self.connections), "connections_busy": busy,
                "connections_accepted_total": self.accepted_total, "draining": self.draining}

    # Serving ----------------------------------------------------------------------
    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._listeners = listeners
        async with trio.open_nursery() as outer:
            outer.start_soon(self._expire_loop)
            async with trio.open_nursery() as connections:
                self._connections_nursery = connections
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        task_status.started()
                # Drain: the accept loops are gone; wait for in-flight work (bounded by
                # the grace timer that drain() started).
            outer.cancel_scope.cancel()

    async def _expire_loop(self) -> None:
        """Start the watchers of streams still going after WATCH_DELAY_S, and close
        connections whose read phase (idle, head, body) outlasted its deadline.

        One timer for every connection, instead of a trio deadline per request (a cancel
        scope with a deadline is among the costliest things a request does): every
        ``tick`` it cancels the connections whose ``deadline`` passed, so a phase ends
        between its timeout and one tick later.  With no stream waiting for a watcher it
        sleeps until the next such scan (or a stream's ``watch_later``), so an idle
        gateway and whole answers cost no wake-up every WATCH_DELAY_S.
        """
        limits = self.limits
        shortest = min(limits.header_timeout_s, limits.body_timeout_s,
                       limits.keepalive_timeout_s)
        tick = min(1.0, max(0.01, shortest / 10))
        next_scan = trio.current_time() + tick
        while True:
            if self._watch_later:
                await trio.sleep(min(tick, WATCH_DELAY_S))
            else:
                self._watch_wakeup = trio.Event()
                with trio.move_on_at(next_scan):
                    await self._watch_wakeup.wait()
                self._watch_wakeup = None
            now = trio.current_time()
            if self._watch_later:
                due = [r for r, since in self._watch_later.items()
                       if now - since >= WATCH_DELAY_S]
                for responder in due:
                    del self._watch_later[responder]
                    responder.start_watcher()
            if now >= next_scan:
                next_scan = now + tick
                for conn in self.connections:
                    if conn.deadline <= now:
                        conn.scope.cancel()

    def watch_later(self, responder: Responder) -> None:
        self._watch_later[responder] = trio.current_time()
        if self._watch_wakeup is not None:
            self._watch_wakeup.set()
            self._watch_wakeup = None

    def unwatch(self, responder: Responder) -> None:
        self._watch_later.pop(responder, None)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno in _TRANSIENT_ACCEPT:
                    log.error("accept failed (%s); retrying in 100 ms", errno.errorcode.get(exc.errno))
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                self._slots.release()
                raise
            self.accepted_total += 1
            nursery.start_soon(self._serve_one, stream)
            self._accept_waiting(listener, nursery)

    def _accept_waiting(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Every connection already waiting in the backlog, without a scheduling round
        each: ``listener.accept`` yields twice per connection, and while it waits its turn
        every busy connection serves a request, so a burst of 32 new clients (a load
        balancer's or a benchmark's) took 130 ms to be let in at c=32.  Errors, and an
        empty backlog, end the burst; the next ``listener.accept`` meets and handles them.
        """
        raw = getattr(listener.socket, "_sock", None)  # trio's socket wraps a stdlib one
        if raw is None:
            return
        while True:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                sock, _ = raw.accept()
            except OSError:  # BlockingIOError: none waiting; others: see above
                self._slots.release()
                return
            self.accepted_total += 1
            nursery.start_soon(self._serve_one,
                               trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = Connection()
        self.connections.add(conn)
        try:
            try:
                stream.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
            except OSError:
                pass  # a socket that is already reset: serve_connection will see it
            await serve_connection(stream, self.handler, self.limits, self, conn,
                                   self.render_error)
        finally:
            self.connections.discard(conn)
            self._slots.release()
            if self.draining and not self.connections:
                self._all_closed.set()

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, finish in-flight work within ``grace_s``, then cut the rest."""
        if self.draining:
            return
        self.draining = True
        self._accept_scope.cancel()
        for listener in self._listeners:
            await listener.aclose()
        for conn in list(self.connections):
            if conn.idle:
                conn.scope.cancel()
        if self.connections:
            with trio.move_on_after(grace_s):
                await self._all_closed.wait()
        if self.connections:
            log.warning("grace period over: closing %d connections", len(self.connections))
            self._connections_nursery.cancel_scope.cancel()


async def open_listeners(host: str, port: int, *, reuse_port: bool = False,
                         backlog: int = 4096) -> list[trio.SocketListener]:
    """Listening sockets for host:port; with ``reuse_port`` several workers share it."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_STREAM,
                                          flags=stdsocket.AI_PASSIVE)
    listeners = []
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEPORT, 1)
        if family == stdsocket.AF_INET6:
            sock.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 1)
        await sock.bind(addr)
        sock.listen(backlog)
        listeners.append(trio.SocketListener(sock))
    return listeners
