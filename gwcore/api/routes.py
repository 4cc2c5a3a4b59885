"""The gateway's request handler: (method, path) -> endpoint, errors, access log."""
from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gwcore.accesslog import AccessLog
from gwcore.accounting import PICO, PriceTable
from gwcore.auth import Authenticator
from gwcore.cache import ResponseCache
from gwcore.metrics import Metrics
from gwcore.errors import (GatewayError, InvalidRequest, MethodNotAllowed, NotFound,
                           RequestTooLarge)
from gwcore.pipeline import Outcome, Pipeline
from gwcore.ports import AuditRecord, AuditSink, KeyStore
from gwcore.ratelimit import RateLimiter
from gwcore.server.connection import Request, Responder

log = logging.getLogger("gwcore.api")

JSON = [(b"content-type", b"application/json")]
# Errors on these paths are in Anthropic's format; every other path's in OpenAI's.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/messages"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# Request ids the gateway makes: 48 random bits per process, then a counter (unique
# across workers and restarts, without a getrandom call per request).
_RID_PREFIX = os.urandom(6).hex().encode()
_rid_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

Endpoint = Callable[["Gateway", Request, Responder, Outcome, list[tuple[bytes, bytes]]],
                    Awaitable[None]]


class Gateway:
    def __init__(self, pipeline: Pipeline, auth: Authenticator, access_log: AccessLog,
                 limiter: RateLimiter, cache: ResponseCache, metrics: Metrics,
                 *, prices: PriceTable | None = None,
                 ready: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 statistics: Callable[[], dict[str, Any]] | None = None) -> None:
        from gwcore.api import admin, anthropic, openai, ops  # they import this module's types

        self.pipeline = pipeline
        self.auth = auth
        self.limiter = limiter
        self.cache = cache
        self.metrics = metrics
        self.metrics_require_key = False
        self.key_store: KeyStore | None = None
        self.audit: AuditSink | None = None
        self.audit_enabled = True
        self.prices = prices or PriceTable()
        self.access_log = access_log
        self.ready = ready
        self.statistics = statistics
        table: dict[tuple[str, str], Endpoint] = {
            ("POST", "/v1/chat/completions"): openai.chat_completions,
            ("POST", "/v1/embeddings"): openai.embeddings,
            ("GET", "/v1/models"): openai.list_models,
            ("POST", "/v1/responses"): openai.responses,
            ("POST", "/v1/messages"): anthropic.messages,
            ("GET", "/healthz"): ops.healthz,
            ("GET", "/readyz"): ops.readyz,
            ("GET", "/metrics"): ops.metrics,
        }
        # Also without the /v1 prefix, for clients whose base URL lacks it.
        for (method, path), fn in list(table.items()):
            if path.startswith("/v1/"):
                table[(method, path[3:])] = fn
        self.table = table
        self.admin: Endpoint = admin.handle
        self.paths = {path for _, path in table}

    async def __call__(self, request: Request, responder: Responder) -> None:
        rid = request.header(b"x-request-id")
        if rid is None or not _REQUEST_ID.match(rid):
            rid = b"req_%s%012x" % (_RID_PREFIX, next(_rid_counter))
        headers = [(b"x-request-id", rid)]
        out = Outcome()
        try:
            endpoint = self.table.get((request.method, request.path))
            if endpoint is None and request.path.startswith("/admin/"):
                endpoint = self.admin
            if endpoint is None:
                if request.path in self.paths:
                    raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}.")
                raise NotFound(f"Unknown route: {request.method} {request.path}.")
            await endpoint(self, request, responder, out, headers)
        except GatewayError as exc:
            out.error_code = exc.code
            if not responder.started:
                body = (exc.anthropic_body() if request.path in ANTHROPIC_PATHS
                        else exc.openai_body())
                await responder.send(exc.status, headers + JSON + _encode(exc.headers), body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client went away or stopped reading: not a bug of ours
        except Exception:
            # A bug of ours: answered (and logged, audited) as the 500 it is, here,
            # rather than by the server after this request's record said 499.
            log.exception("handler failed on %s %s", request.method, request.path)
            out.error_code = "internal_error"
            if not responder.started:
                exc = GatewayError("Internal error in the gateway.")
                body = (exc.anthropic_body() if request.path in ANTHROPIC_PATHS
                        else exc.openai_body())
                await responder.send(500, headers + JSON + [(b"connection", b"close")], body)
        finally:
            if request.path not in ("/healthz", "/readyz", "/metrics"):
                self._log(request, responder, out, rid)

    def _log(self, request: Request, responder: Responder, out: Outcome, rid: bytes) -> None:
        latency_s = time.perf_counter() - request.started_at
        routed = out.provider is not None
        endpoint = request.path if request.path in self.paths else "other"
        usage = out.usage
        cost_pico: int | None = None
        record: dict[str, Any] = {
            "level": "info", "msg": "request", "request_id": rid.decode(),
            "method": request.method, "path": request.path,
            "status": responder.status or 499,  # 499: the client went away first
            "latency_ms": round(latency_s * 1000, 3),
            "client": request.client, "bytes_out": responder.bytes_sent,
        }
        if out.model is not None:
            record["model"] = out.model
        if out.provider is not None:
            record.update(provider=out.provider, upstream_model=out.upstream_model,
                          attempts=out.attempts)
        if out.usage is not None:
            record.update(prompt_tokens=out.usage.prompt_tokens,
                          completion_tokens=out.usage.completion_tokens)
            if out.usage.cached_tokens:
                record["cached_tokens"] = out.usage.cached_tokens
            if out.usage.reasoning_tokens:
                record["reasoning_tokens"] = out.usage.reasoning_tokens
            if out.upstream_model is not None and out.extra.get("cache") != "hit":
                cost = cost_pico = self.prices.cost_pico(out.upstream_model, out.usage)
                if cost is not None:
                    record["cost_usd"] = cost / PICO
                    if out.key is not None:
                        self.auth.add_spend(out.key, cost)
        if out.ttft_s is not None:
            record["ttft_ms"] = round(out.ttft_s * 1000, 3)
        if out.error_code is not None:
            record["error"] = out.error_code
        if out.extra:
            record.update(out.extra)
        self.access_log.record(record)
        self.metrics.record(endpoint, (out.model or "") if routed else "", out.provider or "",
                            record["status"], out.error_code or "", latency_s, out.ttft_s,
                            usage.prompt_tokens if usage else 0,
                            usage.completion_tokens if usage else 0, cost_pico)
        if self.audit is not None and self.audit_enabled:
            self.audit.submit(AuditRecord(
                ts=time.time() - latency_s, request_id=record["request_id"],
                key_id=out.key.id if out.key is not None else None, user=out.user,
                client_ip=request.client, endpoint=endpoint, model=out.model,
                provider=out.provider, upstream_model=out.upstream_model,
                status=record["status"],
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0,
                reasoning_tokens=usage.reasoning_tokens if usage else 0,
                cost_pico=cost_pico, latency_ms=record["latency_ms"],
                ttft_ms=record.get("ttft_ms"), cache_hit=out.extra.get("cache") == "hit",
                error_code=out.error_code))


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers]


def render_protocol_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The body for errors the server itself raises (400/413/431/500/501) in OpenAI format."""
    codes = {431: "request_header_fields_too_large", 501: "unsupported_transfer_coding",
             505: "http_version_not_supported"}
    if status == 413:
        exc: GatewayError = RequestTooLarge(message)
    elif status >= 500 and status not in codes:
        exc = GatewayError(message)
    else:  # the client's request, 501 and 505 included: not a fault of the gateway
        exc = InvalidRequest(message, code=codes.get(status, "invalid_http_request"))
    return JSON, exc.openai_body()
