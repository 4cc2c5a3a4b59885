"""The native upstream pool (gwcore.transport) against scripted raw-socket servers.

Each server here writes exactly the bytes a test needs (a keep-alive answer, an
answer followed by a silent close, ``Connection: close``, nothing at all), so the
pool's reuse and retry rules are checked against what a real peer can do.
"""
from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
import trio
import trustme

from gwcore.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gwcore.providers.base import UpstreamRequest
from gwcore.transport import Exchange, NativePools
from gwcore.upstream import Timeouts, Upstreams

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


class Scripted:
    """A raw HTTP/1.1 server: ``answer(n)`` gives the bytes for the n-th request and
    whether to close the connection after them (None: close without answering)."""

    def __init__(self, answer: Callable[[int], tuple[bytes | None, bool]]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.open_now = 0
        self.max_open = 0
        self.port = 0
        self.delay_s = 0.0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                self.requests += 1
                if self.delay_s:
                    await trio.sleep(self.delay_s)
                data, close = self.answer(self.requests)
                if data is None:
                    return
                await stream.send_all(data)
                if close:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def serve(nursery: trio.Nursery, server: Scripted) -> Scripted:
    listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
def make_pools():
    """NativePools instances, their idle connections closed after the test."""
    made: list[NativePools] = []

    def make(**kwargs: object) -> NativePools:
        made.append(NativePools(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for pools in made:
        pools.close()


def request(url: str, method: str = "POST", body: bytes = b"{}") -> UpstreamRequest:
    return UpstreamRequest(method, url, [("content-type", "application/json")], body)


async def fetch(pools: NativePools, url: str, method: str = "POST",
                read_s: float = 5.0) -> tuple[int, bytes]:
    async with pools.exchange(method, url, [("content-type", "application/json")],
                              b"{}" if method == "POST" else b"", 2.0, read_s) as resp:
        return resp.status, await resp.read()


async def test_keep_alive_connections_are_reused(make_pools) -> None:
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (OK, False)))
        for _ in range(20):
            assert await fetch(pools, server.url()) == (200, b'{"ok":true}')
        assert (server.connections, server.requests) == (1, 20)
        assert pools.statistics() == {"upstream_connections": 1, "upstream_connections_idle": 1,
                                      "upstream_stale_resends_total": 0}
        pools.close()
        assert pools.statistics()["upstream_connections"] == 0
        nursery.cancel_scope.cancel()


async def test_connection_close_and_half_read_answers_are_not_reused(make_pools) -> None:
    close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100000
    answers = {1: (close, True), 2: (big, False), 3: (OK, False)}
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: answers.get(n, (OK, False))))
        assert await fetch(pools, server.url()) == (200, b"hi")
        async with pools.exchange("POST", server.url(), [], b"{}", 2, 5) as resp:
            assert resp.status == 200  # the body is left unread
        assert await fetch(pools, server.url()) == (200, b'{"ok":true}')
        assert server.connections == 3
        assert pools.statistics()["upstream_connections"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("peek_after_s", [0.0, 1.0])
async def test_an_idle_connection_the_server_closed_is_not_used(peek_after_s: float,
                                                                make_pools) -> None:
    # The server answers without announcing a close, then closes (an idle timeout).
    # Idle for peek_after_s or more, the peek finds the close before use; idle for less
    # (1.0: the default, 50 ms here), the request fails on it and goes on a fresh one.
    pools = make_pools(peek_after_s=peek_after_s)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (OK, True)))
        for _ in range(5):
            assert await fetch(pools, server.url()) == (200, b'{"ok":true}')
            await trio.sleep(0.05)  # the FIN arrives while the connection is idle
        assert (server.connections, server.requests) == (5, 5)
        resends = pools.statistics()["upstream_stale_resends_total"]
        assert resends == (0 if peek_after_s == 0.0 else 4)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_reused_connection_closed_without_an_answer(method: str, make_pools) -> None:
    """The keep-alive race: the server closes a reused connection after the request
    went out, without a byte of answer.  The request goes once more on a fresh
    connection (for a POST too: see the module docstring of gwcore.transport)."""
    answers = {2: (None, True)}
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: answers.get(n, (OK, False))))
        assert await fetch(pools, server.url(), method) == (200, b'{"ok":true}')
        assert await fetch(pools, server.url(), method) == (200, b'{"ok":true}')
        assert (server.connections, server.requests) == (2, 3)
        assert pools.statistics()["upstream_connections"] == 1
        nursery.cancel_scope.cancel()


async def test_a_fresh_connection_closed_without_an_answer_is_not_resent(make_pools) -> None:
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (None, True)))
        with pytest.raises(UpstreamError):
            await fetch(pools, server.url())
        assert (server.connections, server.requests) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_refused_silent_and_broken_upstreams_give_gateway_errors(make_pools) -> None:
    pools = make_pools()
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(UpstreamUnavailable):
        await fetch(pools, f"http://127.0.0.1:{closed_port}/v1/x")
    truncated = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"partial"
    garbage = b"HTTP/1.1 two hundred\r\n\r\n"
    async with trio.open_nursery() as nursery:
        silent = await serve(nursery, Scripted(lambda n: (b"", False)))
        with trio.fail_after(3):
            with pytest.raises(UpstreamTimeout):
                await fetch(pools, silent.url(), read_s=0.2)
        cut = await serve(nursery, Scripted(lambda n: (truncated, True)))
        with pytest.raises(UpstreamError, match="broke off"):
            await fetch(pools, cut.url())
        bad = await serve(nursery, Scripted(lambda n: (garbage, True)))
        with pytest.raises(UpstreamError, match="invalid response"):
            await fetch(pools, bad.url())
        assert pools.statistics()["upstream_connections"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("timer", [True, False], ids=["timer", "scope"])
async def test_a_whole_answer_is_bounded_by_its_deadlines(timer: bool, make_pools) -> None:
    """first_byte_at bounds the head (on a reused connection too: a slow upstream is not
    a stale connection, so the request is not sent again), end_at the body.  With the
    pools' timer running, a deadline fires within a tick; without it, a cancel scope
    keeps it.  A connection cut off by a deadline is not reused."""
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"partial"
    answers = {1: (OK, False), 2: (b"", False)}
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        if timer:
            nursery.start_soon(pools.run)
        silent = await serve(nursery, Scripted(lambda n: answers.get(n, (b"", False))))
        stalled = await serve(nursery, Scripted(lambda n: (head, False)))
        assert await fetch(pools, silent.url()) == (200, b'{"ok":true}')
        for server, phase in ((silent, "head"), (stalled, "body")):
            now = trio.current_time()
            first_byte_at = now + (0.2 if phase == "head" else 5.0)
            end_at = now + (5.0 if phase == "head" else 0.2)
            with trio.fail_after(3), pytest.raises(UpstreamTimeout):
                async with pools.exchange("POST", server.url(), [], b"{}", 2.0, 60.0,
                                          first_byte_at, end_at) as resp:
                    await resp.read()
            late_s = trio.current_time() - now - 0.2
            assert 0 <= late_s < 0.5, late_s
        assert (silent.connections, silent.requests) == (1, 2)
        assert pools.statistics()["upstream_connections"] == 0
        assert pools.statistics()["upstream_stale_resends_total"] == 0
        nursery.cancel_scope.cancel()


async def test_the_pool_caps_open_connections_per_origin(make_pools) -> None:
    pools = make_pools(max_connections=2)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (OK, False)))
        server.delay_s = 0.05  # answers overlap, so an uncapped pool would open 10
        results: list[tuple[int, bytes]] = []

        async def one() -> None:
            results.append(await fetch(pools, server.url()))

        async with trio.open_nursery() as clients:
            for _ in range(10):
                clients.start_soon(one)
        assert results == [(200, b'{"ok":true}')] * 10
        assert server.max_open == 2
        assert pools.statistics()["upstream_connections"] <= 2
        nursery.cancel_scope.cancel()


async def test_requests_waiting_for_a_capped_pool_are_served_first_come_first_served(
        make_pools) -> None:
    # One connection; a client that sends its next request the moment it has its
    # answer, and another that waits meanwhile.  The connection given back goes to the
    # waiter.  (It used to go onto the idle stack, where the busy client took it again
    # before the woken waiter ran: at c=256 with a capped pool some requests waited
    # over 2 s while others barged past.)
    pools = make_pools(max_connections=1)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (OK, False)))
        server.delay_s = 0.01
        order: list[str] = []

        async def busy() -> None:
            for i in range(4):
                await fetch(pools, server.url())
                order.append(f"busy{i}")

        async def waiter() -> None:
            await fetch(pools, server.url())
            order.append("waiter")

        async with trio.open_nursery() as clients:
            clients.start_soon(busy)
            await trio.sleep(0.003)  # busy holds the connection now
            clients.start_soon(waiter)
        assert order == ["busy0", "waiter", "busy1", "busy2", "busy3"]
        assert server.max_open == 1
        nursery.cancel_scope.cancel()


async def test_a_waiter_cancelled_after_being_handed_a_connection_passes_it_on(
        make_pools) -> None:
    pools = make_pools(max_connections=1)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (OK, False)))
        server.delay_s = 0.05
        results: list[str] = []

        async def impatient() -> None:
            with trio.move_on_after(0.05):  # gives up while the first holds the slot
                await fetch(pools, server.url())
                results.append("impatient")

        async def patient() -> None:
            results.append(str((await fetch(pools, server.url()))[0]))

        async with trio.open_nursery() as clients:
            clients.start_soon(patient)
            await trio.sleep(0.005)
            clients.start_soon(impatient)
            await trio.sleep(0.005)
            clients.start_soon(patient)
        assert results == ["200", "200"]
        assert pools.statistics()["upstream_connections"] == 1
        with trio.fail_after(2):  # the slot was not lost
            assert await fetch(pools, server.url()) == (200, b'{"ok":true}')
        nursery.cancel_scope.cancel()


async def test_a_cancelled_stream_closes_its_connection_and_frees_its_slot(make_pools) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'data: {"x":1}\n\n'
    first = head + b"%x\r\n%s\r\n" % (len(event), event)  # then nothing: a stalled stream
    pools = make_pools(max_connections=1)
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (first if n == 1 else OK, False)))
        got: list[bytes] = []
        with trio.move_on_after(0.3):
            async with pools.exchange("POST", server.url(), [], b"{}", 2, 60) as resp:
                async for chunk in resp.chunks():
                    got.append(chunk)
        assert got == [event]
        assert pools.statistics()["upstream_connections"] == 0
        # The only slot is free again: the next request gets through at once.
        with trio.fail_after(2):
            assert await fetch(pools, server.url()) == (200, b'{"ok":true}')
        nursery.cancel_scope.cancel()


async def test_tls_upstreams_through_trio_sslstream(tmp_path, make_pools) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = Scripted(lambda n: (OK, False))

    async def tls_handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return
        await server.handle(tls)  # type: ignore[arg-type]

    pools = make_pools()
    pools._ssl = client_ctx
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, tls_handle, 0)
        port = listeners[0].socket.getsockname()[1]
        url = f"https://localhost:{port}/v1/chat/completions"
        for _ in range(3):
            assert await fetch(pools, url) == (200, b'{"ok":true}')
        assert server.connections == 1
        # A certificate the client does not trust is refused.
        strict = make_pools()
        with pytest.raises(UpstreamUnavailable, match="TLS"):
            await fetch(strict, url)
        nursery.cancel_scope.cancel()


async def test_an_egress_proxy_sends_native_deployments_through_httpx(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    async with Upstreams() as up:
        assert up._needs_proxy("https://api.openai.com/v1/chat/completions")
        assert not up._needs_proxy("https://127.0.0.1:9/v1/chat/completions")
        assert not up._needs_proxy("http://api.openai.com/v1/x")  # no HTTP_PROXY
        direct = up.open(request("https://127.0.0.1:9/v1/chat/completions"), Timeouts())
        proxied = up.open(request("https://api.openai.com/v1/chat/completions"), Timeouts())
        assert isinstance(direct, Exchange) and not isinstance(proxied, Exchange)


@pytest.mark.parametrize("first_alone", [False, True])
async def test_body_read_together_comes_as_one_chunk_or_first_alone(make_pools,
                                                                   first_alone) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    events = [b'data: {"n":%d}\n\n' % i for i in range(4)]
    whole = head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    pools = make_pools()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, Scripted(lambda n: (whole, False)))
        async with pools.exchange("POST", server.url(), [], b"{}", 2, 60) as resp:
            got = [chunk async for chunk in resp.chunks(first_alone=first_alone)]
        # Every event arrived in one read: relayed in one piece (one write to the
        # client), or with first_alone (an idle worker) the first on its own.
        assert got == ([events[0], b"".join(events[1:])] if first_alone
                       else [b"".join(events)])
        nursery.cancel_scope.cancel()
