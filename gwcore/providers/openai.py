"""OpenAI (and any OpenAI-compatible server): passthrough with usage accounting.

Requests are forwarded with the deployment's model and key.  For streams the gateway
asks for ``stream_options.include_usage`` so every stream is accounted, and strips the
usage-only chunk again when the client did not ask for it (DESIGN.md, Accounting).
"""
from __future__ import annotations

from typing import Any

import orjson

from gwcore.config import Deployment
from gwnative import encode_event
from gwcore.errors import GatewayError, UpstreamError, UpstreamStatus
from gwcore.providers.base import UpstreamRequest, request_json
from gwcore.wire import Usage, openai_error, openai_usage


def join_url(base: str, path: str) -> str:
    """``base`` + ``path``, keeping a query string of the base at the end."""
    root, sep, query = base.partition("?")
    return f"{root.rstrip('/')}{path}{sep}{query}"


def _headers(api_key: str | None) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json"), ("accept", "application/json")]
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def build_chat(body: dict[str, Any], dep: Deployment, base: str, api_key: str | None,
               raw: bytes = b"") -> UpstreamRequest:
    """``raw``: the body's bytes as the client sent them, forwarded as they are when
    nothing needs changing (the model is the deployment's, and a stream already asks
    for its usage): no copy of the request, no serialising it again."""
    stream = body.get("stream") is True
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if raw and body.get("model") == dep.model and (wants_usage or not stream):
        return UpstreamRequest("POST", join_url(base, "/chat/completions"), _headers(api_key),
                               raw, stream=stream)
    out = dict(body)
    out["model"] = dep.model
    injected = False
    if stream and not wants_usage:
        out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}
        injected = True
    return UpstreamRequest("POST", join_url(base, "/chat/completions"), _headers(api_key),
                           request_json(out), stream=stream, injected_usage=injected)


def _passthrough(body: dict[str, Any], dep: Deployment, raw: bytes) -> bytes:
    """The client's bytes when the model is already the deployment's, else re-written."""
    if raw and body.get("model") == dep.model:
        return raw
    out = dict(body)
    out["model"] = dep.model
    return request_json(out)


def build_embeddings(body: dict[str, Any], dep: Deployment, base: str,
                     api_key: str | None, raw: bytes = b"") -> UpstreamRequest:
    return UpstreamRequest("POST", join_url(base, "/embeddings"), _headers(api_key),
                           _passthrough(body, dep, raw))


def build_responses(body: dict[str, Any], dep: Deployment, base: str,
                    api_key: str | None, raw: bytes = b"") -> UpstreamRequest:
    """OpenAI Responses API, passed through with the deployment's model."""
    return UpstreamRequest("POST", join_url(base, "/responses"), _headers(api_key),
                           _passthrough(body, dep, raw), stream=body.get("stream") is True)


def parse_chat(body: bytes, model: str, created: int) -> tuple[bytes, Usage | None]:
    """OpenAI answers are already in the hub format."""
    return body, openai_usage(body)



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


def _scalar(value: Any) -> Any:
    """A field that must be a JSON scalar in a chat answer (id, model, finish_reason ...)."""
    return value if value is None or isinstance(value, (str, int, float)) else None


def completion_to_events(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A stored chat.completion replayed as the chunks OpenAI would have streamed.

    The stored answer is whatever the upstream sent with its 200, so this reads it
    leniently and never raises: its stream has begun by the time this runs.  Parts of
    an unexpected shape are left out (a choice that is not an object, content that is
    not text); the usage goes only when it can be written.
    """
    base = {"id": _scalar(completion.get("id")), "object": "chat.completion.chunk",
            "created": _scalar(completion.get("created")),
            "model": _scalar(completion.get("model")),
            "system_fingerprint": _scalar(completion.get("system_fingerprint"))}
    extra = {"usage": None} if include_usage else {}
    out = []
    choices = completion.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        i = choice.get("index", 0)
        i = i if type(i) is int else 0
        first = {"role": "assistant", "content": ""}
        out.append({**base, "choices": [{"index": i, "delta": first, "logprobs": None,
                                          "finish_reason": None}], **extra})
        if isinstance(content, str) and content:
            out.append({**base, "choices": [{"index": i, "delta": {"content": content},
                                              "logprobs": None, "finish_reason": None}], **extra})
        out.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                          "finish_reason": _scalar(choice.get("finish_reason"))}],
                    **extra})
    frames = [encode_event(orjson.dumps(c)) for c in out]
    if include_usage:
        usage = completion.get("usage")
        try:
            frames.append(encode_event(orjson.dumps({**base, "choices": [], "usage": usage})))
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            frames.append(encode_event(orjson.dumps({**base, "choices": [], "usage": None})))
    return frames + [encode_event("[DONE]")]


class StreamAssembler:
    """Collects a streamed chat answer into the plain chat.completion it stands for.

    Only single-choice text answers are assembled; anything else (tool calls, several
    choices, refusals) makes ``result`` None, and the answer is not cached.
    """

    def __init__(self) -> None:
        self.ok = True
        self.meta: dict[str, Any] = {}
        self.parts: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None

    def add(self, data: str) -> None:
        """One chunk's data.  A chunk of any unexpected shape (not an object, a choice
        that is not one, content that is not text) only makes the answer uncacheable:
        this runs mid-stream, where raising would cut the client's stream."""
        if not self.ok or data == "[DONE]":
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.ok = False
            return
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list):
            self.ok = False
            return
        if not self.meta:
            self.meta = {k: _scalar(chunk.get(k))
                         for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict) or choice.get("index", 0) != 0 \
                    or delta.get("tool_calls") or delta.get("refusal") \
                    or delta.get("function_call"):
                self.ok = False
                return
            content, finish = delta.get("content"), choice.get("finish_reason")
            if content is not None and not isinstance(content, str) or \
                    finish is not None and not isinstance(finish, str):
                self.ok = False
                return
            if content:
                self.parts.append(content)
            if finish:
                self.finish = finish

    def result(self) -> bytes | None:
        if not self.ok or self.finish is None:
            return None
        try:
            return self._dumps()
        except orjson.JSONEncodeError:  # a usage nested deeper than orjson writes
            return None

    def _dumps(self) -> bytes:
        return orjson.dumps({
            **{k: v for k, v in self.meta.items()}, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.parts),
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": self.finish}],
            "usage": self.usage})
