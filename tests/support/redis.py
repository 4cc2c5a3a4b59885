"""A real ``redis-server`` for the tests: one per session, on a free port, no persistence.

``redis_server`` (session) starts it; ``redis`` (function) flushes it before each test and
makes sure it is running (an outage test may have stopped it).  ``RedisServer.stop`` and
``start`` simulate an outage and a recovery on the same port.

``python -m tests.support.redis worker ...`` is one "gateway worker" for the
multi-process test: a RateLimiter on the shared Redis, admitting as fast as it can for a
while, printing the monotonic time of every admission (``time.monotonic`` is the same
clock in every process of one machine).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.procs import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running():
            return
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command(b"PING") == b"+PONG":
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a shutdown)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, *parts: bytes) -> bytes:
        """One command over a plain socket (no client library): the first reply line."""
        msg = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(msg)
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.strip()

    def flush(self) -> None:
        self.command(b"FLUSHALL")
        self.command(b"SCRIPT", b"FLUSH")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        pytest.fail("redis-server is not installed: scripts/test installs it (Debian: "
                    "apt-get install redis-server)", pytrace=False)
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    redis_server.start()
    redis_server.flush()
    return redis_server


def limits_config(requests: int | None = None, window_s: float = 60.0, *,
                  tokens_per_minute: int | None = None, models: dict[str, Any] | None = None,
                  redis_fail: str = "open", instances: int = 0, workers: int = 1) -> Any:
    """What RateLimiter reads from a Config, with the new ``limits`` fields (which the
    msgspec Config may not have yet)."""
    from gwcore.config import LimitSpec

    default = LimitSpec(requests=requests, window_s=window_s,
                        tokens_per_minute=tokens_per_minute)
    return SimpleNamespace(
        limits=SimpleNamespace(default=default, models=models or {}, redis_fail=redis_fail,
                               instances=instances),
        server=SimpleNamespace(workers=workers))


async def _worker(url: str, key_id: str, requests: int, window_s: float, instances: int,
                  duration_s: float, concurrency: int, start_at: float) -> None:
    import trio

    from gwcore.auth import KeyInfo
    from gwcore.errors import RateLimited
    from gwcore.ratelimit import RateLimiter
    from gwcore.stores.redis import open_redis

    cfg = limits_config(requests, window_s, instances=instances)
    key = KeyInfo(id=key_id, name=key_id)
    times: list[float] = []
    trips = 0
    async with open_redis(url) as conn:
        limiter = RateLimiter(cfg, redis=conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limiter.run)
            await trio.sleep(max(0.0, start_at - time.monotonic()))
            end = time.monotonic() + duration_s

            async def client() -> None:
                nonlocal trips
                while time.monotonic() < end:
                    try:
                        adm = await limiter.admit(key, "m", {}, 0, trio.current_time())
                    except RateLimited:
                        await trio.sleep(0.002)
                        continue
                    times.append(time.monotonic())
                    trips += adm.round_trips
                    await trio.sleep(0)

            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(client)
            nursery.cancel_scope.cancel()
    sys.stdout.write(f"trips {trips}\n" + "".join(f"{t!r}\n" for t in times))
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    import trio

    if argv[:1] == ["worker"]:
        url, key_id, requests, window_s, instances, duration_s, concurrency, start_at = argv[1:]
        trio.run(_worker, url, key_id, int(requests), float(window_s), int(instances),
                 float(duration_s), int(concurrency), float(start_at))
    else:
        raise SystemExit("usage: python -m tests.support.redis worker URL KEY REQUESTS "
                         "WINDOW_S INSTANCES DURATION_S CONCURRENCY START_AT")


if __name__ == "__main__":
    main(sys.argv[1:])
