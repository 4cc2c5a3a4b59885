"""Many connections, pipelining, and the size limits exactly at their boundaries.

* 10,000 idle keep-alive connections, held by a child process (tests/hardening/
  idle_clients.py): a normal client is served meanwhile, with sane latency, and the
  idle ones are still alive and answer afterwards.
* Pipelined requests of every kind on one connection: answered in order, each answer
  carrying its own request's id and echo.
* Head and body limits: exactly at the limit is served, one byte over is a 431/413,
  whether the bytes come in one piece or many.
"""
from __future__ import annotations

import resource
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import orjson
import pytest

from gwcore.providers import mock
from tests.conftest import ROOT
from tests.hardening.conftest import ThreadedGateway, threaded_gateway
from tests.hardening.wire import (exchange, healthz_ok, parse_responses, request,
                                  send_and_read)

IDLE_CONNECTIONS = 10_000
# Descriptors a process needs besides the connections (the gateway's SQLite, pipes,
# the interpreter's own files), kept free when the limit is tight.
SPARE_FDS = 300


@pytest.fixture(scope="module")
def nofile() -> Iterator[tuple[int, int]]:
    """RLIMIT_NOFILE raised to its hard limit for this module: (soft before, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield soft, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def roomy_gateway(tmp_path_factory: pytest.TempPathFactory,
                  nofile: tuple[int, int]) -> Iterator[ThreadedGateway]:
    with threaded_gateway(tmp_path_factory.mktemp("gw"), demo=True,
                          **{"server.max_connections": IDLE_CONNECTIONS + 500,
                             "server.keepalive_timeout_s": 300.0,
                             "server.shutdown_grace_s": 2.0,
                             "limits.default.requests": 10**9}) as gw:
        yield gw


def _line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"no answer from the idle clients within {timeout_s} s")
    return proc.stdout.readline().strip()


def _timed(port: int) -> float:
    started = time.perf_counter()
    body = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]})
    parsed, _ = exchange(port, request("GET", "/healthz") +
                         request("POST", "/v1/chat/completions", body))
    assert [r.status for r in parsed.responses] == [200, 200]
    return time.perf_counter() - started


def test_10000_idle_keep_alive_connections_and_a_normal_client_is_served(
        roomy_gateway: ThreadedGateway, nofile: tuple[int, int],
        record_property: pytest.RecordProperty) -> None:
    soft, hard = nofile
    count = min(IDLE_CONNECTIONS, hard - SPARE_FDS)
    record_property("nofile_soft_before", soft)
    record_property("nofile_hard", hard)
    record_property("idle_connections", count)
    if count < IDLE_CONNECTIONS:
        print(f"RLIMIT_NOFILE hard limit {hard}: holding {count} idle connections, "
              f"not {IDLE_CONNECTIONS}")
    baseline = statistics.median(_timed(roomy_gateway.port) for _ in range(5))
    with subprocess.Popen([sys.executable, "-m", "tests.hardening.idle_clients",
                           str(roomy_gateway.port), str(count)],
                          cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        _hold_and_check(roomy_gateway, proc, count, baseline)
    # Their closing is seen, and every task ends.
    deadline = time.monotonic() + 30
    while roomy_gateway.statistics()["connections_open"] > 0:
        assert time.monotonic() < deadline, roomy_gateway.statistics()
        time.sleep(0.05)
    assert healthz_ok(roomy_gateway.port)


def _hold_and_check(roomy_gateway: ThreadedGateway, proc: subprocess.Popen[str],
                    count: int, baseline: float) -> None:
    assert proc.stdin is not None
    try:
        ready = _line(proc, 90)
        assert ready.startswith("READY"), ready
        assert int(ready.split()[1]) == count
        assert roomy_gateway.statistics()["connections_open"] >= count
        # A normal client meanwhile: served, and not much slower than with none open.
        latencies = [_timed(roomy_gateway.port) for _ in range(20)]
        assert statistics.median(latencies) < max(0.25, 20 * baseline), latencies
        assert max(latencies) < 2.0, latencies
        print(f"{ready}; normal client: median {statistics.median(latencies) * 1000:.1f} ms "
              f"(idle: {baseline * 1000:.1f} ms), max {max(latencies) * 1000:.1f} ms")
        # The idle ones are all still open, and answer again.
        proc.stdin.write("CHECK 200\n")
        proc.stdin.flush()
        checked = _line(proc, 30).split()
        assert checked == ["CHECKED", "200", "0"], checked
        proc.stdin.write("EXIT\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- pipelining -------------------------------------------------------------------------------

def _pipelined(n: int) -> tuple[bytes, list[str], list[tuple[str, int]]]:
    """Requests of every kind, each with its id and echo: (bytes, methods, expected)."""
    raw, methods, expected = [], [], []
    for i in range(n):
        echo = f"echo-{i}"
        rid = [("x-request-id", f"p-{i}")]
        kind = ["chat", "stream", "embed", "messages", "models", "health", "missing",
                "bad-json", "head"][i % 9]
        if kind in ("chat", "stream"):
            body = orjson.dumps({"model": "mock-1", "stream": kind == "stream",
                                 "messages": [{"role": "user", "content": echo}]})
            raw.append(request("POST", "/v1/chat/completions", body, headers=rid,
                               chunked=i % 2 == 1))
        elif kind == "embed":
            body = orjson.dumps({"model": "text-embedding-3-small", "input": echo})
            raw.append(request("POST", "/v1/embeddings", body, headers=rid))
        elif kind == "messages":
            body = orjson.dumps({"model": "mock-1", "max_tokens": 50,
                                 "messages": [{"role": "user", "content": echo}]})
            raw.append(request("POST", "/v1/messages", body, headers=rid))
        elif kind == "models":
            raw.append(request("GET", "/v1/models", headers=rid))
        elif kind == "health":
            raw.append(request("GET", "/healthz", headers=rid))
        elif kind == "missing":
            raw.append(request("GET", f"/{echo}", headers=rid))
        elif kind == "bad-json":
            raw.append(request("POST", "/v1/chat/completions", b"{" + echo.encode(), headers=rid))
        else:
            raw.append(request("HEAD", "/healthz", headers=rid))
        methods.append("HEAD" if kind == "head" else "POST")
        expected.append((kind, i))
    return b"".join(raw), methods, expected


def _check_echo(resp, kind: str, i: int) -> None:
    echo = f"echo-{i}"
    assert resp.header(b"x-request-id") == f"p-{i}".encode(), (i, kind, resp.status)
    if kind == "chat":
        assert resp.status == 200
        assert resp.json()["choices"][0]["message"]["content"].endswith(f"You said: {echo}")
    elif kind == "stream":
        assert resp.status == 200
        events = [orjson.loads(line[6:]) for line in resp.body.decode().split("\n")
                  if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if e["choices"])
        assert text.endswith(f"You said: {echo}") and resp.body.endswith(b"data: [DONE]\n\n")
    elif kind == "embed":
        assert resp.status == 200
        assert resp.json()["data"][0]["embedding"] == mock._vector(echo)
    elif kind == "messages":
        assert resp.status == 200
        assert resp.json()["content"][0]["text"].endswith(f"You said: {echo}")
    elif kind in ("models", "health"):
        assert resp.status == 200
    elif kind == "missing":
        assert resp.status == 404 and echo in resp.json()["error"]["message"]
    elif kind == "bad-json":
        assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json"
    else:  # HEAD: the 405's head only
        assert resp.status == 405 and resp.body == b""


@pytest.mark.parametrize("piece_bytes", [0, 7, 1000], ids=["whole", "7-byte-pieces",
                                                          "1000-byte-pieces"])
def test_pipelined_requests_are_answered_in_order_without_mixing(
        demo_gateway: ThreadedGateway, piece_bytes: int) -> None:
    raw, methods, expected = _pipelined(45)
    pieces = [raw] if not piece_bytes else \
        [raw[i:i + piece_bytes] for i in range(0, len(raw), piece_bytes)]
    if len(pieces) > 400:  # bounded time: the first 400 pieces small, then the rest
        pieces = pieces[:400] + [b"".join(pieces[400:])]
    got = send_and_read(demo_gateway.port, pieces, timeout_s=20,
                        pause_s=0.0002 if piece_bytes else 0.0)
    assert got.closed
    parsed = parse_responses(got.data, got.closed, methods)
    assert len(parsed.responses) == len(expected)
    for resp, (kind, i) in zip(parsed.responses, expected):
        _check_echo(resp, kind, i)


def test_pipelined_requests_on_a_connection_that_stays_open(
        demo_gateway: ThreadedGateway) -> None:
    # Without a half-close: every answer comes, and the connection stays usable.
    raw, methods, expected = _pipelined(18)
    sock = demo_gateway.connect()
    try:
        sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + 10
        while len((parsed := parse_responses(data, False, methods)).responses) < len(expected):
            assert time.monotonic() < deadline, data[-500:]
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            assert chunk, "the server closed a connection that should stay open"
            data += chunk
        assert parsed.complete
        for resp, (kind, i) in zip(parsed.responses, expected):
            _check_echo(resp, kind, i)
        sock.sendall(request("GET", "/healthz"))
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()


# -- limits at their boundaries -------------------------------------------------------------

MAX_HEADER = 8192      # demo_gateway's server.max_header_bytes
MAX_BODY = 64 * 1024   # demo_gateway's server.max_body_bytes


def head_of(size: int, start: bytes = b"GET /healthz HTTP/1.1\r\nhost: x\r\n") -> bytes:
    """A head of exactly ``size`` bytes, request line to blank line (a filler field)."""
    start += b"x-fill: "
    end = b"\r\n\r\n"
    head = start + b"f" * (size - len(start) - len(end)) + end
    assert len(head) == size
    return head


def body_of(size: int) -> bytes:
    """An embeddings request body of exactly ``size`` bytes (JSON padded with spaces)."""
    body = orjson.dumps({"model": "text-embedding-3-small", "input": "at the limit"})
    return body + b" " * (size - len(body))


def _status(port: int, raw: bytes, pieces: int) -> int:
    step = max(1, -(-len(raw) // pieces))
    got = send_and_read(port, [raw[i:i + step] for i in range(0, len(raw), step)],
                        pause_s=0.0005 if pieces > 1 else 0.0)
    parsed = parse_responses(got.data, got.closed)
    assert len(parsed.responses) == 1, parsed.responses
    return parsed.responses[0].status


# Regression: the 431 check after parsing measured the head from h11's parsed fields (a
# few bytes less than the raw head, and blind to whitespace), while h11 bounds an
# incomplete head by its raw bytes: the same head could pass in one piece and get a
# 431 in several.  Now both use the raw head, request line through the blank line.
@pytest.mark.parametrize("pieces", [1, 3, 40])
def test_a_head_of_exactly_the_limit_is_served_one_byte_more_is_a_431(
        demo_gateway: ThreadedGateway, pieces: int) -> None:
    assert _status(demo_gateway.port, head_of(MAX_HEADER), pieces) == 200
    assert _status(demo_gateway.port, head_of(MAX_HEADER + 1), pieces) == 431
    # The limit is the head's own: the body that follows in the same bytes does not count.
    body = body_of(1000)
    start = b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % len(body)
    assert _status(demo_gateway.port, head_of(MAX_HEADER, start) + body, pieces) == 200
    assert _status(demo_gateway.port, head_of(MAX_HEADER + 1, start) + body, pieces) == 431


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("pieces", [1, 5])
def test_a_body_of_exactly_the_limit_is_served_one_byte_more_is_a_413(
        demo_gateway: ThreadedGateway, chunked: bool, pieces: int) -> None:
    for size, status in ((MAX_BODY, 200), (MAX_BODY + 1, 413)):
        body = body_of(size)
        if chunked:  # in two chunks, so the limit is crossed by the second
            half = size // 2
            raw = (b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                   + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], size - half,
                                                          body[half:]))
        else:
            raw = request("POST", "/v1/embeddings", body)
        assert _status(demo_gateway.port, raw, pieces) == status, size


def test_a_413_is_answered_before_the_body_is_sent(demo_gateway: ThreadedGateway) -> None:
    # Regression (chunked): a chunk size over the limit was read on until the data
    # passed it.  Declared sizes over the limit are refused from the head or the
    # chunk-size line,
    # so a client waiting for the answer before sending (Expect: 100-continue) is not
    # left hanging.
    for raw in (b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                % (MAX_BODY + 1),
                b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                b"%x\r\n" % (MAX_BODY + 1)):
        parsed, got = exchange(demo_gateway.port, raw, half_close=False)
        assert got.closed and [r.status for r in parsed.responses] == [413]


def test_an_answer_that_closes_is_not_lost_to_unread_pipelined_bytes(
        demo_gateway: ThreadedGateway) -> None:
    # Regression: after an answer that ends the connection ("connection: close", or
    # HTTP/1.0) the server closed at once with the client's further bytes unread; the
    # kernel then answers with a reset, which can destroy the answer before the client
    # has read it.  Now it shuts its side and reads the rest away, as after an error.
    more = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 4000
    for first in (b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                  b"GET /healthz HTTP/1.0\r\n\r\n"):
        for _ in range(5):
            got = send_and_read(demo_gateway.port, first + more, half_close=False)
            assert got.closed and not got.reset
            parsed = parse_responses(got.data, got.closed)
            assert [r.status for r in parsed.responses] == [200]
