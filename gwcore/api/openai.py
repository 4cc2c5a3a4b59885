"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/embeddings, /v1/models.

Each call: authenticate -> parse -> model allowed? -> route -> rate limits (gwnative
buckets) -> cache lookup (gwnative cache key) -> upstream -> cache store -> settle the
token reservation with the real usage.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
import trio

from gwcore.auth import KeyInfo
from gwcore.cache import directives
from gwcore.errors import InvalidRequest
from gwcore.pipeline import Call, Outcome, parse_json_body, require_model
from gwcore.ratelimit import estimate_usage
from gwcore.providers import mock
from gwcore.providers.openai import StreamAssembler, completion_to_events
from gwcore.server.connection import Request, Responder
from gwcore.wire import Usage
from gwnative.errors import CacheKeyError

if TYPE_CHECKING:
    from gwcore.api.routes import Gateway

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
       (b"x-accel-buffering", b"no")]
NO_USAGE = Usage()


async def _authenticate(gw: "Gateway", request: Request, out: Outcome) -> KeyInfo:
    key = await gw.auth.authenticate(request.header(b"authorization"))
    out.key = key
    out.extra["key"] = key.name
    return key


async def chat_completions(gw: "Gateway", request: Request, responder: Responder,
                           out: Outcome, headers: list[tuple[bytes, bytes]]) -> None:
    key = await _authenticate(gw, request, out)
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
    call = Call("chat", body, "openai", bool(stream), _timeout_hint(request), request.body)
    await serve_call(gw, request, responder, out, headers, key, model, call, SSE)


async def embeddings(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                     headers: list[tuple[bytes, bytes]]) -> None:
    key = await _authenticate(gw, request, out)
    body = parse_json_body(request.body)
    model = require_model(body)
    out.model = model
    value = body.get("input")
    if not isinstance(value, (str, list)) or not value:
        raise InvalidRequest("'input' is required: a string or a non-empty array.",
                             code="invalid_type" if value is not None
                             else "missing_required_parameter", param="input")
    call = Call("embeddings", body, "openai", False, _timeout_hint(request), request.body)
    await serve_call(gw, request, responder, out, headers, key, model, call, SSE)


async def responses(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                    headers: list[tuple[bytes, bytes]]) -> None:
    """OpenAI Responses API, passed through to OpenAI-family deployments."""
    key = await _authenticate(gw, request, out)
    body = parse_json_body(request.body)
    model = require_model(body)
    out.model = model
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequest("'stream' must be a boolean.", code="invalid_type", param="stream")
    call = Call("responses", body, "openai", bool(stream), _timeout_hint(request), request.body)
    await serve_call(gw, request, responder, out, headers, key, model, call, SSE)


def _timeout_hint(request: Request) -> bytes | None:
    return request.header(b"x-gateway-timeout") or request.header(b"x-stainless-timeout")


async def serve_call(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                     headers: list[tuple[bytes, bytes]], key: KeyInfo, model: str,
                     call: Call, sse: list[tuple[bytes, bytes]]) -> None:
    """Limits around the answer: admit, answer (cache or upstream), settle."""
    user = call.body.get("user") if call.api == "openai" else \
        (call.body.get("metadata") or {}).get("user_id") if isinstance(call.body.get("metadata"), dict) else None
    out.user = user if isinstance(user, str) else None
    key.check_model(model)
    route = gw.pipeline.route(model)  # 404 before any limit is spent
    await gw.auth.check_budget(key)
    body = call.hub() if call.kind == "chat" else call.body
    reserved = 0
    if key.budget_pico is not None:  # the dollar limit reserves an estimate, as tokens do
        estimate = gw.prices.cost_pico(model, estimate_usage(body, len(request.body)))
        if estimate is None:  # priced by the upstream model when the name is a route's
            estimate = gw.prices.cost_pico(route.deployments[0].model,
                                           estimate_usage(body, len(request.body)))
        reserved = gw.auth.reserve(key, estimate or 0)
    try:
        adm = await gw.limiter.admit(key, model, body, len(request.body), trio.current_time())
    except BaseException:
        gw.auth.release(key, reserved)
        raise
    headers.extend(adm.headers)
    try:
        await _answer(gw, request, responder, out, headers, key, call, route, sse)
    finally:
        gw.auth.release(key, reserved)
        # Also when the client left mid-way (the handler is cancelled): whatever usage
        # the upstream reported is what the reservation settles to.
        usage = NO_USAGE if out.extra.get("cache") == "hit" else out.usage
        gw.limiter.settle(adm, usage, trio.current_time(),
                          failed=not responder.started or out.error_code is not None)


async def _answer(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                  headers: list[tuple[bytes, bytes]], key: KeyInfo, call: Call, route: Any,
                  sse: list[tuple[bytes, bytes]]) -> None:
    """Serve from the cache or the upstream (usage lands in ``out``).

    Only OpenAI chat and embeddings are cached: the stored value is the plain OpenAI
    answer, which a streamed request gets replayed as a stream.
    """
    cache = gw.cache
    ckey = None
    store = False
    if cache.enabled and call.api == "openai" and call.kind in ("chat", "embeddings"):
        no_cache, no_store = directives(request.header(b"cache-control"))
        try:
            ckey = cache.key(call.kind, request.body, key.id)
        except CacheKeyError as exc:  # e.g. nested deeper than the key function allows
            raise InvalidRequest(f"The request body cannot be used: {exc}.",
                                 code="invalid_json") from exc
        store = not no_store
        hit = None if no_cache else await cache.get(ckey, trio.current_time())
        if hit is not None:
            out.extra["cache"] = "hit"
            headers.append((b"x-gateway-cache", b"HIT"))
            if call.stream:
                await responder.start_stream(200, headers + sse)
                for event in completion_to_events(orjson.loads(hit), call.client_wants_usage()):
                    await responder.send_chunk(event)
                await responder.end_stream()
            else:
                await responder.send(200, headers + JSON, hit)
            return
        headers.append((b"x-gateway-cache", b"MISS"))
    if call.stream:
        assembler = StreamAssembler() if ckey is not None and store else None
        try:
            await gw.pipeline.stream(call, route, responder, out, headers + sse,
                                     assembler.add if assembler is not None else None)
        finally:
            # Also when the client hung up right after [DONE] (SDKs do) and this task is
            # being cancelled: a complete answer is stored all the same.
            result = assembler.result() if assembler is not None and out.error_code is None \
                else None
            if result is not None:
                with trio.move_on_after(1.0, shield=True):
                    await cache.put(ckey, result, trio.current_time())  # type: ignore[arg-type]
        return
    data, extra = await gw.pipeline.forward(call, route, out)
    await responder.send(200, headers + JSON + extra, data)
    if ckey is not None and store:  # after the answer: a Redis put never delays it
        with trio.move_on_after(1.0, shield=True):
            await cache.put(ckey, data, trio.current_time())


async def list_models(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                      headers: list[tuple[bytes, bytes]]) -> None:
    """Declared model names, plus the mock's in demo mode.

    Names that route by prefix (``gpt-*`` ...) are open-ended, so they are not listed;
    a key restricted to certain models sees only those.
    """
    key = await _authenticate(gw, request, out)
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
