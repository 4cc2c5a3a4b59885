"""Raw HTTP/1.1 over a real socket, parsed with an h11 client: for server tests."""
from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio


@dataclass
class RawResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)


async def read_response(stream: trio.SocketStream, conn: h11.Connection | None = None,
                        timeout_s: float = 5.0) -> RawResponse | None:
    """One response from the stream; None if the server closed without answering."""
    conn = conn or h11.Connection(h11.CLIENT)
    if conn.our_state is h11.IDLE:
        # A raw request was written by the caller: tell h11 a request went out.
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
    resp: RawResponse | None = None
    with trio.fail_after(timeout_s):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                resp = RawResponse(event.status_code, dict(event.headers))
            elif isinstance(event, h11.Data):
                assert resp is not None
                resp.chunks.append(bytes(event.data))
                resp.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return resp
            elif isinstance(event, h11.ConnectionClosed):
                return resp


async def exchange(port: int, raw: bytes, timeout_s: float = 5.0) -> RawResponse | None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        try:
            return await read_response(stream, timeout_s=timeout_s)
        except h11.RemoteProtocolError:
            return None


async def closed_by_peer(stream: trio.SocketStream, timeout_s: float = 5.0) -> bool:
    """True when the server closes the connection (EOF or reset) within the timeout."""
    with trio.move_on_after(timeout_s):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True
    return False


async def connect(gw) -> trio.SocketStream:
    """A client stream to the gateway, closed when the gateway fixture ends."""
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    gw.on_close.append(stream)
    return stream
