"""/healthz and /readyz: no key needed (meant for internal probes)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import os

import orjson
import trio

from gwcore.pipeline import Outcome
from gwcore.server.connection import Request, Responder

if TYPE_CHECKING:
    from gwcore.api.routes import Gateway

JSON = [(b"content-type", b"application/json")]
_OK = orjson.dumps({"status": "ok", "pid": os.getpid()})


async def healthz(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                  headers: list[tuple[bytes, bytes]]) -> None:
    await responder.send(200, headers + JSON, _OK)


async def readyz(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                 headers: list[tuple[bytes, bytes]]) -> None:
    checks = await gw.ready() if gw.ready is not None else {}
    ok = all(v in ("ok", "degraded") for v in checks.values())
    body = orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks})
    await responder.send(200 if ok else 503, headers + JSON, body)


async def metrics(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                  headers: list[tuple[bytes, bytes]]) -> None:
    if gw.metrics_require_key:
        await gw.auth.authenticate(request.header(b"authorization"))
    body = gw.metrics.render(trio.current_time())
    await responder.send(200, headers + [(b"content-type", b"text/plain; version=0.0.4")], body)
