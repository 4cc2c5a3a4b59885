"""The floor: a trio + h11 reverse proxy with a keep-alive pool and no logic at all.

What the issue's table calls "trio + h11 on both sides (a 60-line keep-alive pool), no
logic", measured beside the gateway (``python -m benchmarks --minimal``) so that the
gateway's cost can be read as "the floor plus what the pipeline adds".  It uses the
h11 the gateway uses (``gwcore._h11``: h11-mypyc when installed) and trio's socket
streams; it passes every request to one upstream origin and relays the answer as it
arrives (streams too).  No auth, limits, routing, accounting or logs; errors close the
connection.  Not for production: it is a measuring stick.

    python benchmarks/minimal_proxy.py --port 9200 --upstream http://127.0.0.1:9100
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gwcore._h11 import h11  # noqa: E402

Pool = list[tuple[trio.SocketStream, "h11.Connection"]]


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def serve(client: trio.SocketStream, host: str, port: int, idle: Pool) -> None:
    server = h11.Connection(h11.SERVER)
    while True:
        request = await _next(server, client)
        if type(request) is not h11.Request:
            return
        if request.target == b"/healthz":
            await _next(server, client)  # EndOfMessage
            await client.send_all(server.send(h11.Response(status_code=200, headers=[
                (b"content-length", b"2")])) + server.send(h11.Data(data=b"ok"))
                + server.send(h11.EndOfMessage()))
            server.start_next_cycle()
            continue
        body = b""
        while type(event := await _next(server, client)) is h11.Data:
            body += event.data
        if idle:
            up, conn = idle.pop()
        else:
            up, conn = await trio.open_tcp_stream(host, port), h11.Connection(h11.CLIENT)
        headers = [(n, v) for n, v in request.headers if n not in (b"host", b"content-length")]
        headers += [(b"host", f"{host}:{port}".encode()), (b"content-length", b"%d" % len(body))]
        await up.send_all(conn.send(h11.Request(method=request.method, target=request.target,
                                                headers=headers))
                          + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        response = await _next(conn, up)
        out = [(n, v) for n, v in response.headers if n in (b"content-type", b"content-length")]
        data = server.send(h11.Response(status_code=response.status_code, headers=out))
        while type(event := await _next(conn, up)) is h11.Data:
            await client.send_all(data + server.send(h11.Data(data=event.data)))
            data = b""
        await client.send_all(data + server.send(h11.EndOfMessage()))
        conn.start_next_cycle()
        idle.append((up, conn))
        server.start_next_cycle()


async def main(port: int, upstream: str) -> None:
    parts = urlsplit(upstream)
    host, up_port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: Pool = []

    async def handle(client: trio.SocketStream) -> None:
        try:
            await serve(client, host, up_port, idle)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            return  # the measuring stick drops what it does not expect

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"minimal proxy listening on http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
          f" -> {upstream}", flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream", required=True, help="the upstream origin, e.g. http://127.0.0.1:9100")
    a = p.parse_args()
    try:
        trio.run(main, a.port, a.upstream)
    except KeyboardInterrupt:
        pass
