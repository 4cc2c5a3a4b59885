"""One request's way to an upstream and back: route, attempts, retries, fallbacks.

How this works: a model name resolves to a ``Route`` (deployments, fallbacks, retries,
timeout).  ``attempts`` yields (route, deployment) pairs: up to ``retries + 1`` tries
over the route's deployments in weighted order, then the same for each fallback model.
An attempt that fails with a retryable error (connect error, timeout, 429, 500, 502,
503, 504) moves on after a backoff (exponential with full jitter, or the upstream's
``retry-after`` when it gives one); any other error ends the request at once.

For streams, nothing is retried once a byte of the upstream's answer has been sent to
the client; after that an error is a final SSE error event.  While a stream waits for
its first event, ``: ping`` comments go out every ``stream_keepalive_s``; the first
ping commits the 200 head, so a long-waiting client is kept alive at the cost of
reporting any later failure as an SSE error event instead of an HTTP status.
"""
from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

import gwnative as native
from gwnative.errors import SSEError
from gwcore.config import Deployment
from gwcore.errors import (GatewayError, InvalidRequest, ModelNotFound, UpstreamError,
                           UpstreamTimeout, UpstreamUnavailable)
from gwcore.providers import openai as openai_provider
from gwcore.providers.base import StreamState, UpstreamRequest
from gwcore.routing import Route, Router, attempt_order
from gwcore.upstream import Timeouts, Upstreams, UpstreamResponse
from gwcore.wire import Usage, openai_usage

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Backoff: 0.1 s doubling per retry, capped at 2 s, with full jitter (AWS architecture
# blog, "Exponential Backoff And Jitter"); a retry-after longer than MAX_RETRY_AFTER_S
# is not waited for: the error goes to the client instead.
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0
MAX_RETRY_AFTER_S = 10.0
OPENAI_FAMILY = frozenset({"openai", "mock"})
PING = b": ping\n\n"


@dataclass(slots=True)
class Outcome:
    """What the access log and accounting learn about one request."""
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    attempts: int = 0
    usage: Usage | None = None
    error_code: str | None = None
    ttft_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(self, router: Router, upstreams: Upstreams, *, stream_keepalive_s: float,
                 rng: random.Random | None = None) -> None:
        self.router = router
        self.upstreams = upstreams
        self.stream_keepalive_s = stream_keepalive_s
        self.rng = rng or random.Random()

    # -- routing ------------------------------------------------------------------
    def route(self, model: str) -> Route:
        route = self.router.resolve(model)
        if route is None:
            raise ModelNotFound(f"The model '{model}' does not exist or no provider is "
                                "configured for it.", param="model")
        return route

    def attempts(self, route: Route) -> Iterator[tuple[Route, Deployment]]:
        seen = {route.name}
        chain = [route]
        for name in route.fallbacks:
            fb = self.router.resolve(name)
            if fb is not None and name not in seen:
                seen.add(name)
                chain.append(fb)
        for r in chain:
            order = attempt_order(r, self.rng)
            for i in range(r.retries + 1):
                yield r, order[i % len(order)]

    def build(self, kind: str, body: dict[str, Any], dep: Deployment) -> UpstreamRequest:
        if dep.provider not in OPENAI_FAMILY:
            raise GatewayError(f"The {dep.provider} provider is not available in this "
                               "build yet.")
        base = self.router.base_url(dep)
        key = self.router.api_key(dep)
        if kind == "chat":
            return openai_provider.build_chat(body, dep, base, key)
        return openai_provider.build_embeddings(body, dep, base, key)

    async def backoff(self, retry: int, error: GatewayError) -> bool:
        """Wait before the next attempt; False when the error says not to retry."""
        after = _retry_after(error)
        if after is not None:
            if after > MAX_RETRY_AFTER_S:
                return False
            await trio.sleep(after)
            return True
        await trio.sleep(self.rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** retry)))
        return True

    # -- non-streaming ------------------------------------------------------------
    async def forward(self, kind: str, body: dict[str, Any], route: Route,
                      out: Outcome) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """Send a non-streaming request; the upstream's body and the headers to add."""
        last: GatewayError | None = None
        for n, (r, dep) in enumerate(self.attempts(route)):
            if n and last is not None and not await self.backoff(n - 1, last):
                break
            out.attempts += 1
            out.provider, out.upstream_model = dep.provider, dep.model
            ureq = self.build(kind, body, dep)
            timeout_s = dep.timeout_s or r.timeout_s
            try:
                with trio.fail_after(timeout_s):
                    async with self.upstreams.open(ureq, Timeouts(read_s=timeout_s,
                                                                  total_s=timeout_s)) as resp:
                        data = await resp.read()
            except trio.TooSlowError:
                last = UpstreamTimeout()
                continue
            except (UpstreamUnavailable, UpstreamTimeout, UpstreamError) as exc:
                last = exc
                continue
            if resp.status == 200:
                out.usage = openai_usage(data)
                return data, _gateway_headers(dep)
            last = openai_provider.map_error(resp.status, data, resp.headers)
            if resp.status not in RETRYABLE_STATUS:
                raise last
        raise last or UpstreamUnavailable()

    # -- streaming ----------------------------------------------------------------
    async def stream(self, body: dict[str, Any], route: Route, responder: Any,
                     out: Outcome, sse_headers: list[tuple[bytes, bytes]],
                     observe: Callable[[str], None] | None = None) -> None:
        """Stream a chat completion to ``responder`` (a server Responder).

        ``observe`` sees every upstream event's data (the cache assembles answers with it).
        """
        committed = False

        async def commit(extra: list[tuple[bytes, bytes]]) -> None:
            nonlocal committed
            if not committed:
                committed = True
                await responder.start_stream(200, sse_headers + extra)

        async def pinger() -> None:
            while True:
                await trio.sleep(self.stream_keepalive_s)
                # Shielded so that a cancel never leaves half a ping on the wire.
                with trio.CancelScope(shield=True):
                    await commit([])
                    await responder.send_chunk(PING)

        parser = native.SSEParser()
        state = StreamState()
        first: list[bytes] = []
        async with AsyncExitStack() as stack:
            resp: UpstreamResponse | None = None
            ureq: UpstreamRequest | None = None
            chunks: AsyncIterator[bytes] | None = None
            dep: Deployment | None = None
            error: GatewayError | None = None
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                if self.stream_keepalive_s > 0:
                    nursery.start_soon(pinger)
                try:
                    resp, ureq, dep = await self._open_stream(stack, body, route, out)
                    chunks = resp.chunks()
                    stack.push_async_callback(chunks.aclose)  # type: ignore[attr-defined]
                    async for chunk in chunks:
                        first.append(_translate_openai(parser.feed(chunk), ureq, state, observe))
                        if state.events:
                            break
                except GatewayError as exc:
                    error = exc
                except SSEError as exc:
                    error = UpstreamError(f"The upstream sent a malformed stream: {exc}")
                nursery.cancel_scope.cancel()
            if error is not None and not committed:
                raise error
            out.ttft_s = trio.current_time() - started
            try:
                await commit(_gateway_headers(dep) if dep is not None and resp is not None else [])
                await self._relay(chunks, first, error, parser, ureq, state, observe,
                                  responder, out)
            finally:
                # Recorded even when the client leaves at the last moment (SDKs close
                # right after [DONE]), so the usage is always accounted.
                out.usage = state.usage

    async def _relay(self, chunks: AsyncIterator[bytes] | None, first: list[bytes],
                     error: GatewayError | None, parser: Any, ureq: UpstreamRequest | None,
                     state: StreamState, observe: Callable[[str], None] | None,
                     responder: Any, out: Outcome) -> None:
        """Send the stream on from its first event, ending in [DONE] or an error event."""
        try:
            if error is not None:
                raise error
            for data in first:
                await responder.send_chunk(data)
            assert chunks is not None and ureq is not None
            async for chunk in chunks:
                data = _translate_openai(parser.feed(chunk), ureq, state, observe)
                if data:
                    await responder.send_chunk(data)
            parser.close()
            if parser.truncated or not state.extra.get("done"):
                raise UpstreamError("The upstream stream ended before it was complete.")
        except GatewayError as exc:
            out.error_code = exc.code
            await responder.send_chunk(_error_event(exc.message, exc.type, exc.code))
        except SSEError as exc:
            out.error_code = "upstream_error"
            await responder.send_chunk(_error_event(
                f"The upstream sent a malformed stream: {exc}", "api_error", "upstream_error"))
        await responder.end_stream()

    async def _open_stream(self, stack: AsyncExitStack, body: dict[str, Any], route: Route,
                           out: Outcome) -> tuple[UpstreamResponse, UpstreamRequest, Deployment]:
        last: GatewayError | None = None
        for n, (r, dep) in enumerate(self.attempts(route)):
            if n and last is not None and not await self.backoff(n - 1, last):
                break
            out.attempts += 1
            out.provider, out.upstream_model = dep.provider, dep.model
            ureq = self.build("chat", body, dep)
            timeout_s = dep.timeout_s or r.timeout_s
            attempt = AsyncExitStack()
            try:
                with trio.fail_after(timeout_s):
                    resp = await attempt.enter_async_context(
                        self.upstreams.open(ureq, Timeouts(read_s=timeout_s, total_s=timeout_s)))
                    if resp.status == 200:
                        stack.push_async_exit(attempt.pop_all())
                        return resp, ureq, dep
                    data = await resp.read()
            except trio.TooSlowError:
                last = UpstreamTimeout()
                await attempt.aclose()
                continue
            except (UpstreamUnavailable, UpstreamTimeout, UpstreamError) as exc:
                last = exc
                await attempt.aclose()
                continue
            await attempt.aclose()
            last = openai_provider.map_error(resp.status, data, resp.headers)
            if resp.status not in RETRYABLE_STATUS:
                raise last
        raise last or UpstreamUnavailable()


def _translate_openai(events: list[Any], ureq: UpstreamRequest, state: StreamState,
                      observe: Callable[[str], None] | None) -> bytes:
    """OpenAI passthrough: account usage, drop the usage chunk the gateway asked for."""
    if not events:
        return b""
    out = []
    for ev in events:
        data = ev.data
        state.events += 1
        if observe is not None:
            observe(data)
        if data == "[DONE]":
            state.extra["done"] = True
        elif '"usage"' in data and '"usage":null' not in data:
            usage = openai_usage(data)
            if usage is not None:
                state.usage = usage
                if ureq.injected_usage and openai_provider.is_usage_only_chunk(data):
                    continue
        out.append(native.encode_event(data, ev.event or None, ev.id))
    return b"".join(out)


def _error_event(message: str, type_: str, code: str) -> bytes:
    return native.encode_event(orjson.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}))


def _gateway_headers(dep: Deployment) -> list[tuple[bytes, bytes]]:
    return [(b"x-gateway-provider", dep.provider.encode()),
            (b"x-gateway-model", dep.model.encode("utf-8", "replace"))]


def _retry_after(error: GatewayError) -> float | None:
    for name, value in error.headers:
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.",
                             code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.",
                             code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.",
                             code="missing_required_parameter" if model is None
                             else "invalid_type", param="model")
    return model

