"""Shared fixtures: an in-process gateway on a free port, config helpers."""
from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import HealthCheck, settings

# Property tests check behaviour, not speed: on a shared, loaded machine (CI runs the
# suite twice on 2 cores) per-example deadlines and the too_slow health check measure
# the machine, so they are off for every property test.
settings.register_profile("gwcore", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gwcore")

# gwcore is imported lazily (inside the fixtures), so that tests/native can be
# collected and run even while gwcore does not import.
ROOT = Path(__file__).resolve().parent.parent


def captured_log() -> Any:
    """The real access log, writing into memory so tests can read the lines."""
    from gwcore.accesslog import AccessLog

    class CapturedLog(AccessLog):
        def __init__(self) -> None:
            self.buffer = io.BytesIO()
            super().__init__(self.buffer, flush_s=0.05)

        def lines(self) -> list[dict[str, Any]]:
            self.flush()
            return [orjson.loads(x) for x in self.buffer.getvalue().splitlines()]

        async def wait_for(self, count: int, path: str,
                           timeout_s: float = 5.0) -> list[dict[str, Any]]:
            """The log lines for ``path`` once there are ``count`` of them (the line is
            written after the response, so a client may finish first)."""
            with trio.fail_after(timeout_s):
                while True:
                    got = [r for r in self.lines() if r["path"] == path]
                    if len(got) >= count:
                        return got
                    await trio.sleep(0.01)

    return CapturedLog()


class RunningGateway:
    def __init__(self, app: Any, log: Any) -> None:
        self.app = app
        self.log = log
        self.port = app.ports[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.on_close: list[trio.abc.AsyncResource] = []


def make_config(yaml_text: str | None = None, *, env: dict[str, str] | None = None,
                tmp_path: Path | None = None, **overrides: Any) -> Any:
    from gwcore.config import load_config

    path = None
    if yaml_text is not None:
        assert tmp_path is not None
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml_text)
    environ = {"GATEWAY_PORT": "0", **(env or {})}
    if tmp_path is not None:  # each test its own database and spool
        overrides = {"storage.sqlite_path": str(tmp_path / "gateway.db"),
                     "storage.spool_dir": str(tmp_path / "spool"), **overrides}
    return load_config(path, environ=environ, cwd=tmp_path or ROOT, overrides=overrides)


@asynccontextmanager
async def run_gateway(cfg: Any) -> AsyncIterator[RunningGateway]:
    from gwcore.app import App

    log = captured_log()
    app = App(cfg, access_log=log)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        gw = RunningGateway(app, log)
        try:
            yield gw
        finally:
            for resource in gw.on_close:
                await trio.aclose_forcefully(resource)
            app.shutdown()


@pytest.fixture
def upstream_transport() -> str:
    """The gateway's default upstream transport; a module that redefines this fixture
    with ``params=["native", "httpx"]`` runs its tests on both."""
    return "native"


@pytest.fixture
def gateway_factory(tmp_path: Path, upstream_transport: str) -> Callable[..., Any]:
    def factory(yaml_text: str | None = None, *, env: dict[str, str] | None = None,
                **overrides: Any):
        overrides = {"server.upstream_transport": upstream_transport, **overrides}
        return run_gateway(make_config(yaml_text, env=env, tmp_path=tmp_path, **overrides))
    return factory


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    from tests.support.sdk import close_all

    yield
    close_all()
