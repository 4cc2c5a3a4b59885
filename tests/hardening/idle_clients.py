"""Hold many idle keep-alive connections to a gateway, in a process of their own.

Run by tests/hardening/test_connections.py as ``python -m tests.hardening.idle_clients
PORT COUNT``.  A separate process has its own open-file limit, so the gateway's side
(one descriptor per connection in the test process) and the clients' side do not share
one ``RLIMIT_NOFILE``.

Protocol on stdout/stdin, one line each:
    -> "READY <count> <seconds>"  every connection is open and has had one answer
    <- "CHECK <k>"               send a request on k connections spread over all of
                                 them; also count connections the server closed
    -> "CHECKED <ok> <closed>"
    <- "EXIT"                    close everything and exit
"""
from __future__ import annotations

import resource
import select
import socket
import sys
import time

REQUEST = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
BATCH = 500  # connections opened, then answered, at a time: paced to the server


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def read_answer(sock: socket.socket) -> int:
    """The status of one small answer (headers plus content-length body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the answer")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside the answer")
        body += data
    return int(head.split(b" ", 2)[1])


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    raise_nofile()
    started = time.monotonic()
    socks: list[socket.socket] = []
    for first in range(0, count, BATCH):
        batch = []
        for _ in range(min(BATCH, count - first)):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(REQUEST)
            batch.append(s)
        for s in batch:
            status = read_answer(s)
            if status != 200:
                raise SystemExit(f"answer {status}")
        socks += batch
    print(f"READY {len(socks)} {time.monotonic() - started:.2f}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "CHECK":
            # A readable idle socket means the server closed it (EOF) or said
            # something unasked: either way it is no longer a live idle connection.
            poller = select.poll()
            for i, s in enumerate(socks):
                poller.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
            closed = len(poller.poll(0))
            k = int(args[0])
            ok = 0
            for s in socks[:: max(1, len(socks) // k)][:k]:
                s.sendall(REQUEST)
                ok += read_answer(s) == 200
            print(f"CHECKED {ok} {closed}", flush=True)
        elif cmd == "EXIT":
            break
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
