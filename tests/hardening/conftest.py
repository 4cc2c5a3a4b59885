"""Gateways (and mock upstreams) on free ports in a background thread, for tests that
talk to them with plain blocking sockets.

Hypothesis runs every example of an async test in a fresh ``trio.run``, so a gateway
started by the async ``gateway_factory`` fixture cannot outlive one example.  These run
their own trio loop in a thread for a whole module: the fuzz tests send thousands of
requests to them, each read under a socket timeout, and never wait on them otherwise.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import make_config, run_gateway


class Background:
    """The value of an async context manager entered in a trio loop in another thread."""

    def __init__(self, value: Any, token: trio.lowlevel.TrioToken) -> None:
        self.value = value
        self.token = token

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the loop's thread (for objects only that loop may touch)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)


@contextmanager
def in_background(make: Callable[[], AbstractAsyncContextManager[Any]]) -> Iterator[Background]:
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        box["stop"] = stop = trio.Event()
        async with make() as value:
            box["value"] = value
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # seen by the fixture, not lost in the thread
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="background-trio", daemon=True)
    thread.start()
    started.wait(60)
    if "error" in box or "value" not in box:
        raise RuntimeError(f"the background loop did not start: {box.get('error')!r}")
    try:
        yield Background(box["value"], box["token"])
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(30)
        assert not thread.is_alive(), "the background loop did not stop within 30 s"
        if "error" in box:
            raise box["error"]


class ThreadedGateway:
    def __init__(self, bg: Background) -> None:
        self.bg = bg
        self.app = bg.value.app
        self.log = bg.value.log
        self.port = bg.value.port

    def statistics(self) -> dict[str, Any]:
        return self.bg.call(self.app.server.statistics)

    def log_lines(self) -> list[dict[str, Any]]:
        """The access log so far (read in the gateway's thread, which writes it)."""
        return self.bg.call(self.log.lines)

    def connect(self, timeout_s: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@contextmanager
def threaded_gateway(tmp_path: Path, yaml_text: str | None = None,
                     **overrides: Any) -> Iterator[ThreadedGateway]:
    cfg = make_config(yaml_text, tmp_path=tmp_path, **overrides)
    with in_background(lambda: run_gateway(cfg)) as bg:
        yield ThreadedGateway(bg)


@pytest.fixture(scope="module")
def demo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    """Demo mode (the mock provider for every model), short timeouts, small limits."""
    with threaded_gateway(tmp_path_factory.mktemp("gw"), demo=True,
                          **{"server.header_timeout_s": 1.0, "server.body_timeout_s": 1.0,
                             "server.keepalive_timeout_s": 2.0,
                             "server.max_header_bytes": 8192,
                             "server.max_body_bytes": 64 * 1024,
                             "server.shutdown_grace_s": 1.0,
                             "limits.default.requests": 10**9}) as gw:
        yield gw
