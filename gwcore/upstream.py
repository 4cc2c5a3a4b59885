"""The only httpx user: one pooled AsyncClient per upstream origin.

``Upstreams.open`` sends an ``UpstreamRequest`` and yields an ``UpstreamResponse``
whose body can be read whole or iterated as it arrives.  Leaving the ``async with``
(normally, by an error, or by cancellation when the client went away) closes the
upstream response, which for a stream aborts the upstream request at once.

httpx's exceptions are translated here, keeping the cause:
connect errors -> ``UpstreamUnavailable`` (503), timeouts -> ``UpstreamTimeout`` (504),
a broken response -> ``UpstreamError`` (502).

``mock://`` URLs are answered in-process by the ``mock`` provider through an httpx
transport, so the demo and tests take exactly the same path as real upstreams.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import orjson
import trio

from gwcore.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gwcore.providers import mock
from gwcore.providers.base import UpstreamRequest


@dataclass(slots=True)
class Timeouts:
    connect_s: float = 10.0
    # Between bytes (and until the first byte) of the upstream response.  The total is
    # the caller's: the pipeline wraps each attempt in trio.fail_after.
    read_s: float = 600.0


class UpstreamResponse:
    __slots__ = ("status", "headers", "_response")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = [(k, v) for k, v in response.headers.items()]

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream response broke off: {type(exc).__name__}.") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives.  Close the iterator (``aclose``) when done with it."""
        try:
            async with aclosing(self._response.aiter_raw()) as raw:
                async for chunk in raw:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream stream broke off: {type(exc).__name__}.") from exc


class _MockStream(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes], gap_s: float) -> None:
        self.parts = parts
        self.gap_s = gap_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, part in enumerate(self.parts):
            if i and self.gap_s:
                await trio.sleep(self.gap_s)
            yield part


class MockTransport(httpx.AsyncBaseTransport):
    """Answers OpenAI-format requests with the deterministic ``mock`` provider."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        latency_s, tokens_per_s = mock.pacing(str(request.url))
        if latency_s:
            await trio.sleep(latency_s)
        path = request.url.path
        created = int(time.time())
        if request.method == "GET" and path.endswith("/models"):
            return httpx.Response(200, content=mock.models(created),
                                  headers={"content-type": "application/json"})
        try:
            body = orjson.loads(await request.aread())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return httpx.Response(400, json={"error": {"message": "invalid JSON body",
                                  "type": "invalid_request_error", "param": None, "code": None}})
        model = str(body.get("model") or "mock-1")
        if path.endswith("/embeddings"):
            return httpx.Response(200, content=mock.embeddings(body, model),
                                  headers={"content-type": "application/json"})
        if path.endswith("/chat/completions"):
            if body.get("stream") is True:
                parts = mock.chat_stream(body, model, created)
                gap = 1.0 / tokens_per_s if tokens_per_s else 0.0
                return httpx.Response(200, stream=_MockStream(parts, gap),
                                      headers={"content-type": "text/event-stream"})
            return httpx.Response(200, content=mock.chat_completion(body, model, created),
                                  headers={"content-type": "application/json"})
        return httpx.Response(404, json={"error": {"message": f"Unknown path {path}",
                              "type": "invalid_request_error", "param": None, "code": None}})


class Upstreams:
    """The pooled clients, opened in app.py with ``async with``."""

    def __init__(self, *, max_connections: int = 1000, keepalive: int = 200) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=keepalive, keepalive_expiry=60)
        self.requests_total = 0

    async def __aenter__(self) -> "Upstreams":
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.move_on_after(5, shield=True):
            for client in self._clients.values():
                await client.aclose()
        self._clients.clear()

    def _client(self, url: str) -> httpx.AsyncClient:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        client = self._clients.get(origin)
        if client is None:
            transport = MockTransport() if parts.scheme == "mock" else None
            client = httpx.AsyncClient(limits=self._limits, transport=transport,
                                       follow_redirects=False, trust_env=True)
            self._clients[origin] = client
        return client

    def statistics(self) -> dict[str, int]:
        return {"upstream_clients": len(self._clients), "upstream_requests_total": self.requests_total}

    @asynccontextmanager
    async def open(self, req: UpstreamRequest, timeouts: Timeouts) -> AsyncIterator[UpstreamResponse]:
        client = self._client(req.url)
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s,
                                write=timeouts.read_s, pool=timeouts.connect_s)
        request = client.build_request(req.method, req.url, headers=req.headers,
                                       content=req.body or None, timeout=timeout)
        self.requests_total += 1
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise UpstreamUnavailable("Connecting to the upstream timed out.") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise UpstreamUnavailable("The upstream could not be reached.") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream request failed: {type(exc).__name__}.") from exc
        try:
            yield UpstreamResponse(response)
        finally:
            # Closing a half-read response drops the upstream connection (no drain), so
            # this is quick; the bound keeps a wedged socket from holding us.
            with trio.move_on_after(2, shield=True):
                await response.aclose()
