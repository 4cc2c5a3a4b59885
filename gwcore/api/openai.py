"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/embeddings, /v1/models."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from gwcore.errors import InvalidRequest
from gwcore.pipeline import Outcome, parse_json_body, require_model
from gwcore.providers import mock
from gwcore.server.connection import Request, Responder

if TYPE_CHECKING:
    from gwcore.api.routes import Gateway

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
       (b"x-accel-buffering", b"no")]


def _authenticate(gw: "Gateway", request: Request, out: Outcome):  # -> KeyInfo
    key = gw.auth.authenticate(request.header(b"authorization"))
    out.extra["key"] = key.name
    return key


async def chat_completions(gw: "Gateway", request: Request, responder: Responder,
                           out: Outcome, headers: list[tuple[bytes, bytes]]) -> None:
    key = _authenticate(gw, request, out)
    body = parse_json_body(request.body)
    model = require_model(body)
    out.model = model
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.",
                             code="invalid_type" if messages is not None
                             else "missing_required_parameter", param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequest("'stream' must be a boolean.", code="invalid_type", param="stream")
    key.check_model(model)
    route = gw.pipeline.route(model)
    if stream:
        await gw.pipeline.stream(body, route, responder, out, headers + SSE)
        return
    data, extra = await gw.pipeline.forward("chat", body, route, out)
    await responder.send(200, headers + JSON + extra, data)


async def embeddings(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                     headers: list[tuple[bytes, bytes]]) -> None:
    key = _authenticate(gw, request, out)
    body = parse_json_body(request.body)
    model = require_model(body)
    out.model = model
    value = body.get("input")
    if not isinstance(value, (str, list)) or not value:
        raise InvalidRequest("'input' is required: a string or a non-empty array.",
                             code="invalid_type" if value is not None
                             else "missing_required_parameter", param="input")
    key.check_model(model)
    route = gw.pipeline.route(model)
    data, extra = await gw.pipeline.forward("embeddings", body, route, out)
    await responder.send(200, headers + JSON + extra, data)


async def list_models(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                      headers: list[tuple[bytes, bytes]]) -> None:
    """Declared model names, plus the mock's in demo mode.

    Names that route by prefix (``gpt-*`` ...) are open-ended, so they are not listed;
    a key restricted to certain models sees only those.
    """
    key = _authenticate(gw, request, out)
    router = gw.pipeline.router
    created = int(time.time())
    names: list[str] = router.named_models()
    if router.demo:
        names += [m for m in mock.MODELS if m not in names]
    if key.models is not None:
        names = [n for n in names if n in key.models]
    data: list[dict[str, Any]] = [{"id": n, "object": "model", "created": created,
                                   "owned_by": "gwcore"} for n in names]
    await responder.send(200, headers + JSON, orjson.dumps({"object": "list", "data": data}))
