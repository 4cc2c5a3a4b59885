"""The listener: bursts of new connections, and the count of requests in hand."""
from __future__ import annotations

import socket

import trio
import trio.abc

from gwcore.server.connection import Request, Responder, ServerLimits
from gwcore.server.listener import Server, open_listeners
from tests.support.http import exchange


def _render_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    return [(b"content-type", b"text/plain")], message.encode()


class _AcceptSteps(trio.abc.Instrument):
    """How many times the accept loop's task ran."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_accept_loop"):
            self.steps += 1


async def _ok(request: Request, responder: Responder) -> None:
    await responder.send(200, [(b"content-type", b"text/plain")], b"ok")


async def _burst(max_connections: int, waiting: int) -> tuple[Server, int, list[socket.socket]]:
    """Clients already in the backlog when the server starts accepting: the server, the
    accept loop's steps until it has taken what it may, and the client sockets."""
    server = Server(_ok, ServerLimits(), max_connections=max_connections,
                    render_error=_render_error)
    listeners = await open_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(waiting)]
    steps = _AcceptSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            with trio.fail_after(5):
                while server.accepted_total < min(max_connections, waiting):
                    await trio.sleep(0.01)
            await trio.sleep(0.05)  # nothing more may come in
            taken = steps.steps
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
        for listener in listeners:
            await listener.aclose()
    return server, taken, clients


async def test_a_burst_of_waiting_clients_is_let_in_at_one_wake_up():
    # trio's accept yields twice per connection, and while the accept loop waits for
    # its turn every busy connection serves a request: 32 new clients at c=32 took
    # 130 ms to be let in.  Now one wake-up takes every client already waiting.
    server, steps, clients = await _burst(max_connections=100, waiting=40)
    try:
        assert server.accepted_total == 40
        assert steps <= 6, f"the accept loop ran {steps} times for 40 waiting clients"
    finally:
        for c in clients:
            c.close()


async def test_a_burst_stops_at_the_connection_cap():
    server, _, clients = await _burst(max_connections=5, waiting=12)
    try:
        assert server.accepted_total == 5
        assert len(server.connections) == 0  # all cancelled with the nursery
    finally:
        for c in clients:
            c.close()


async def test_clients_of_a_burst_are_all_served(gateway_factory):
    async with gateway_factory(demo=True) as gw:
        socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(30)]
        try:
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            for s in socks:
                s.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await trio.to_thread.run_sync(s.recv, 65536)
                    assert chunk, "closed before answering"
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 ")
        finally:
            for s in socks:
                s.close()
        resp = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert resp is not None and resp.status == 200


async def test_responders_know_whether_their_request_is_alone():
    seen: list[bool] = []
    both_in = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        seen.append(responder.alone)
        if request.path == "/pair":
            if len(seen) >= 3:
                both_in.set()
            with trio.fail_after(5):
                await both_in.wait()
        await responder.send(200, [(b"content-type", b"text/plain")], b"ok")

    server = Server(handler, ServerLimits(), max_connections=10, render_error=_render_error)
    listeners = await open_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        one = await exchange(port, b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n")
        assert one is not None and one.status == 200
        async with trio.open_nursery() as pair:
            for _ in range(2):
                pair.start_soon(exchange, port, b"GET /pair HTTP/1.1\r\nhost: x\r\n\r\n")
        assert server.handling == 0
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    # The lone request was alone; of the two at once, the second was not.
    assert seen[0] is True and seen[2] is False
