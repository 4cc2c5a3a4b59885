"""Admin API (master key only): /admin/keys and /admin/usage, JSON in and out."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson

from gwcore.accounting import PICO
from gwcore.auth import store_unavailable
from gwcore.errors import GatewayError, InvalidRequest, NotFound
from gwcore.keys import changes_of, new_key, parse_params, show
from gwcore.pipeline import Outcome
from gwcore.server.connection import Request, Responder

if TYPE_CHECKING:
    from gwcore.api.routes import Gateway

JSON = [(b"content-type", b"application/json")]


class AdminOnly(GatewayError):
    status = 403
    type = "permission_error"
    code = "admin_only"
    anthropic_type = "permission_error"
    message = "This route needs the gateway's master key."


class StoreUnavailable(GatewayError):
    """The key or usage store did not answer (the database is down): 503, not a 500."""
    status = 503
    type = "api_error"
    code = "upstream_unavailable"
    anthropic_type = "overloaded_error"
    message = "The key store (the database) cannot be reached right now. Retry shortly."


class StoreMissing(GatewayError):
    status = 501
    type = "api_error"
    code = "no_key_store"
    message = "No key store is configured."


async def handle(gw: "Gateway", request: Request, responder: Responder, out: Outcome,
                 headers: list[tuple[bytes, bytes]]) -> None:
    key = await gw.auth.authenticate(request.header(b"authorization"))
    out.key = key
    out.extra["key"] = key.name
    if not key.is_master:
        raise AdminOnly()
    try:
        await _dispatch(gw, request, responder, headers)
    except GatewayError:
        raise
    except Exception as exc:
        store = gw.key_store if request.path.startswith("/admin/keys") else gw.audit
        if store_unavailable(store, exc):
            raise StoreUnavailable(headers=[("retry-after", "1")]) from exc
        raise


async def _dispatch(gw: "Gateway", request: Request, responder: Responder,
                    headers: list[tuple[bytes, bytes]]) -> None:
    store = gw.key_store
    parts = request.path.rstrip("/").split("/")  # ["", "admin", "keys", id?]
    if parts[2:3] == ["usage"] and len(parts) == 3 and request.method == "GET":
        await _usage(gw, request, responder, headers)
        return
    if parts[2:3] != ["keys"] or len(parts) > 4:
        raise NotFound(f"Unknown admin route: {request.method} {request.path}.")
    if store is None:
        raise StoreMissing()
    key_id = parts[3] if len(parts) == 4 else None
    method = request.method
    if key_id is None and method == "POST":
        params = parse_params(request.body, creating=True)
        record, secret = new_key(params)
        await store.create_key(record)
        await responder.send(201, headers + JSON, orjson.dumps({**show(record), "key": secret}))
    elif key_id is None and method == "GET":
        records = await store.list_keys()
        await responder.send(200, headers + JSON,
                             orjson.dumps({"data": [show(r) for r in records]}))
    elif key_id is not None and method == "GET":
        record = await store.get(key_id)
        if record is None:
            raise NotFound(f"No key with id '{key_id}'.")
        await responder.send(200, headers + JSON, orjson.dumps(show(record)))
    elif key_id is not None and method == "PATCH":
        changes = changes_of(parse_params(request.body, creating=False))
        if not changes:
            raise InvalidRequest("Nothing to change.", code="invalid_value")
        record = await store.update(key_id, changes)
        if record is None:
            raise NotFound(f"No key with id '{key_id}'.")
        gw.auth.forget(record.key_hash)
        await responder.send(200, headers + JSON, orjson.dumps(show(record)))
    elif key_id is not None and method == "DELETE":
        record = await store.get(key_id)
        if record is None or not await store.revoke(key_id, time.time()):
            raise NotFound(f"No key with id '{key_id}'.")
        gw.auth.forget(record.key_hash)
        await responder.send(200, headers + JSON,
                             orjson.dumps({"id": key_id, "revoked": True}))
    else:
        raise NotFound(f"Unknown admin route: {method} {request.path}.")


async def _usage(gw: "Gateway", request: Request, responder: Responder,
                 headers: list[tuple[bytes, bytes]]) -> None:
    if gw.audit is None:
        raise StoreMissing("No usage store is configured.")
    q = {k: v[-1] for k, v in parse_qs(request.query).items()}
    for name in ("since", "until"):
        if name in q and not _is_day(q[name]):
            raise InvalidRequest(f"'{name}' must be a day, YYYY-MM-DD.", code="invalid_value",
                                 param=name)
    rows = await gw.audit.usage(key_id=q.get("key_id"), model=q.get("model"),
                                since=q.get("since"), until=q.get("until"))
    data = [{"day": r.day, "key_id": r.key_id, "model": r.model, "requests": r.requests,
             "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
             "cost_usd": r.cost_pico / PICO} for r in rows]
    await responder.send(200, headers + JSON, orjson.dumps({"data": data}))


def _is_day(value: str) -> bool:
    parts = value.split("-")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and len(value) == 10
