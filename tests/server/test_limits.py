"""The server's limits, over real sockets against the real gateway (demo mode)."""
from __future__ import annotations

import h11
import orjson
import trio

from tests.support.http import closed_by_peer, connect, exchange, read_response

DEMO = {"demo": True}


async def test_oversized_header_block_gets_431(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.max_header_bytes": 4096}) as gw:
        # In several pieces (h11's incomplete-head bound) ...
        stream = await connect(gw)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        for _ in range(10):
            await stream.send_all(b"x-filler: " + b"a" * 1000 + b"\r\n")
        resp = await read_response(stream)
        assert resp is not None and resp.status == 431
        assert orjson.loads(resp.body)["error"]["type"] == "invalid_request_error"
        assert await closed_by_peer(stream)
        # ... and in one piece (our own check after the head is parsed).
        raw = (b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"b" * 5000 + b"\r\n\r\n")
        resp = await exchange(gw.port, raw)
        assert resp is not None and resp.status == 431


async def test_oversized_body_gets_413_before_it_is_read(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.max_body_bytes": 1000}) as gw:
        raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
               b"\r\ncontent-length: 5000\r\n\r\n")
        resp = await exchange(gw.port, raw)  # the body is never sent: the head decides
        assert resp is not None and resp.status == 413
        assert orjson.loads(resp.body)["error"]["code"] == "request_too_large"


async def test_oversized_chunked_body_gets_413(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.max_body_bytes": 1000}) as gw:
        chunk = b"a" * 600
        raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"%x\r\n" % len(chunk) + chunk + b"\r\n" + b"%x\r\n" % len(chunk) + chunk
               + b"\r\n0\r\n\r\n")
        resp = await exchange(gw.port, raw)
        assert resp is not None and resp.status == 413


async def test_garbage_request_line_gets_400_and_the_connection_closes(gateway_factory):
    async with gateway_factory(**DEMO) as gw:
        stream = await connect(gw)
        await stream.send_all(b"\x16\x03\x01 hello there\r\n\r\n")
        resp = await read_response(stream)
        assert resp is not None and resp.status == 400
        assert resp.headers.get(b"connection") == b"close"
        assert await closed_by_peer(stream)
        # The server keeps serving everyone else.
        resp = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert resp is not None and resp.status == 200


async def test_content_length_with_transfer_encoding_is_rejected(gateway_factory):
    async with gateway_factory(**DEMO) as gw:
        raw = (b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
               b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        resp = await exchange(gw.port, raw)
        assert resp is not None and resp.status == 400


async def test_conflicting_content_lengths_are_rejected(gateway_factory):
    async with gateway_factory(**DEMO) as gw:
        raw = (b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
               b"content-length: 5\r\n\r\nabcde")
        resp = await exchange(gw.port, raw)
        assert resp is not None and resp.status == 400


async def test_slow_header_trickle_is_dropped_while_others_are_served(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.header_timeout_s": 0.5}) as gw:
        slow = await connect(gw)
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")
        started = trio.current_time()

        async def trickle() -> None:
            try:
                for _ in range(20):
                    await trio.sleep(0.1)
                    await slow.send_all(b"x-a: b\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            # A normal request meanwhile is served at once.
            resp = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert resp is not None and resp.status == 200
            assert trio.current_time() - started < 0.4
            assert await closed_by_peer(slow, timeout_s=3)
            assert trio.current_time() - started < 1.5
            nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_and_idle_connections_time_out(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.keepalive_timeout_s": 0.5}) as gw:
        stream = await connect(gw)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):
            await stream.send_all(conn.send(h11.Request(method="GET", target="/healthz",
                                                        headers=[("host", "x")])))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            resp = await read_response(stream, conn)
            assert resp is not None and resp.status == 200
            assert resp.headers[b"x-request-id"].startswith(b"req_")
            conn.start_next_cycle()
        assert gw.app.server.statistics()["connections_accepted_total"] == 1
        assert await closed_by_peer(stream, timeout_s=3)


async def test_pipelined_requests_are_answered_in_order(gateway_factory):
    async with gateway_factory(**DEMO) as gw:
        stream = await connect(gw)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: one\r\n\r\n"
                              b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: two\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        ids = []
        for _ in range(2):
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            resp = await read_response(stream, conn)
            assert resp is not None and resp.status == 200
            ids.append(resp.headers[b"x-request-id"])
            conn.start_next_cycle()
        assert ids == [b"one", b"two"]


async def test_connection_cap_makes_extra_clients_wait_for_a_slot(gateway_factory):
    async with gateway_factory(**DEMO, **{"server.max_connections": 2}) as gw:
        a = await connect(gw)
        b = await connect(gw)
        await a.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await read_response(a)).status == 200
        c = await connect(gw)  # sits in the backlog
        await c.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.move_on_after(0.3) as waited:
            await c.receive_some(100)
        assert waited.cancelled_caught, "a third connection was served past the cap"
        assert gw.app.server.statistics()["connections_open"] == 2
        await b.aclose()
        resp = await read_response(c)
        assert resp is not None and resp.status == 200


async def test_unknown_route_and_wrong_method_get_openai_errors(gateway_factory):
    async with gateway_factory(**DEMO) as gw:
        resp = await exchange(gw.port, b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n")
        assert resp.status == 404
        assert orjson.loads(resp.body)["error"]["type"] == "invalid_request_error"
        resp = await exchange(gw.port, b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
        assert resp.status == 405
