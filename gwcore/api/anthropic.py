"""/v1/messages: Anthropic-compatible ingress, so Anthropic SDKs and tools can call any
routed model.  Errors use Anthropic's format (rendered in routes.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from gwcore.api.openai import SSE, serve_call
from gwcore.auth import KeyInfo
from gwcore.errors import InvalidRequest
from gwcore.pipeline import Call, Outcome, parse_json_body
from gwcore.server.connection import Request, Responder

if TYPE_CHECKING:
    from gwcore.api.routes import Gateway



async def messages(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                   headers: list[tuple[bytes, bytes]]) -> None:
    key: KeyInfo = await gw.auth.authenticate(request.header(b"authorization"),
                                              request.header(b"x-api-key"))
    out.key = key
    out.extra["key"] = key.name
    body = parse_json_body(request.body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required", param="model")
    out.model = model
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean", param="stream")
    call = Call("chat", body, "anthropic", stream,
                request.header(b"x-gateway-timeout") or request.header(b"x-stainless-timeout"))
    await serve_call(gw, request, responder, out, headers, key, model, call, SSE)
