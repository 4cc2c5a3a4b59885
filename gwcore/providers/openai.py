"""OpenAI (and any OpenAI-compatible server): passthrough with usage accounting.

Requests are forwarded with the deployment's model and key.  For streams the gateway
asks for ``stream_options.include_usage`` so every stream is accounted, and strips the
usage-only chunk again when the client did not ask for it (DESIGN.md, Accounting).
"""
from __future__ import annotations

from typing import Any

import orjson

from gwcore.config import Deployment
from gwcore.errors import GatewayError, UpstreamError, UpstreamStatus
from gwcore.providers.base import UpstreamRequest
from gwcore.wire import openai_error


def join_url(base: str, path: str) -> str:
    """``base`` + ``path``, keeping a query string of the base at the end."""
    root, sep, query = base.partition("?")
    return f"{root.rstrip('/')}{path}{sep}{query}"


def _headers(api_key: str | None) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json"), ("accept", "application/json")]
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def build_chat(body: dict[str, Any], dep: Deployment, base: str, api_key: str | None) -> UpstreamRequest:
    out = dict(body)
    out["model"] = dep.model
    stream = out.get("stream") is True
    injected = False
    if stream:
        options = out.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
            injected = True
    return UpstreamRequest("POST", join_url(base, "/chat/completions"), _headers(api_key),
                           orjson.dumps(out), stream=stream, injected_usage=injected)


def build_embeddings(body: dict[str, Any], dep: Deployment, base: str,
                     api_key: str | None) -> UpstreamRequest:
    out = dict(body)
    out["model"] = dep.model
    return UpstreamRequest("POST", join_url(base, "/embeddings"), _headers(api_key), orjson.dumps(out))


def build_models(base: str, api_key: str | None) -> UpstreamRequest:
    return UpstreamRequest("GET", join_url(base, "/models"), _headers(api_key), b"")


def is_usage_only_chunk(data: str) -> bool:
    """The final chunk OpenAI sends for include_usage: no choices, a usage object."""
    return '"usage"' in data and '"choices":[]' in data.replace(" ", "")


def map_error(status: int, body: bytes, headers: list[tuple[str, str]]) -> GatewayError:
    """An upstream error response as the error the client should see.

    The client's own mistakes (400, 404, 413, 422) keep their status and the provider's
    message.  401/403 concern the gateway's provider key, not the caller's gateway key,
    so they become a 502.  429 stays a 429 with the upstream's retry-after.  5xx is a
    502 naming the upstream status.
    """
    detail = openai_error(body)
    message = (detail.message if detail and detail.message else None) or \
        body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    retry = [(k, v) for k, v in headers if k.lower() == "retry-after"]
    if status in (400, 404, 409, 413, 415, 422):
        code = detail.code if detail and isinstance(detail.code, str) else None
        return UpstreamStatus(status, message, type_="invalid_request_error",
                              code=code or "invalid_request",
                              param=detail.param if detail else None)
    if status == 429:
        return UpstreamStatus(429, message, type_="rate_limit_error",
                              code="rate_limit_exceeded", headers=retry)
    if status in (401, 403):
        return UpstreamError(f"The upstream rejected the gateway's provider credentials "
                             f"(HTTP {status}).")
    return UpstreamError(f"The upstream returned HTTP {status}: {message}")
