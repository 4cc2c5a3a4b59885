"""The upstream transports: the native trio + h11 pool, and httpx.

Native (``gwcore.transport``) is the default and the fast path; httpx (one pooled
AsyncClient per origin) serves deployments with ``transport: httpx`` and egress
proxies.  Both give the same response interface and raise the same errors.

``Upstreams.open`` sends an ``UpstreamRequest`` and yields an ``UpstreamResponse``
whose body can be read whole or iterated as it arrives.  Leaving the ``async with``
(normally, by an error, or by cancellation when the client went away) closes the
upstream response, which for a stream aborts the upstream request at once.

httpx's exceptions are translated here, keeping the cause:
connect errors -> ``UpstreamUnavailable`` (503), timeouts -> ``UpstreamTimeout`` (504),
a broken response -> ``UpstreamError`` (502).

``mock://`` URLs are answered in-process by the ``mock`` provider (through an httpx
transport for ``transport: httpx``), so the demo and tests take the pipeline's real
path up to the socket.
"""
from __future__ import annotations

import logging
import math
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import trio

from gwcore.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gwcore.providers import mock
from gwcore.providers.base import UpstreamRequest
from gwcore.transport import NativePools

log = logging.getLogger("gwcore.upstream")


@dataclass(slots=True)
class Timeouts:
    connect_s: float = 10.0
    # Between bytes (and until the first byte) of the upstream response.  The total is
    # the caller's: the pipeline wraps each attempt in a cancel scope.
    read_s: float = 600.0
    # A whole answer's deadlines (trio time), instead of read_s: the request out and
    # the head in by first_byte_at, the body (``read()``) by end_at.  Every transport
    # keeps them, failing with UpstreamTimeout, so the caller needs no cancel scope.
    first_byte_at: float = math.inf
    end_at: float = math.inf


class UpstreamResponse:
    __slots__ = ("status", "headers", "_response", "_end_at")

    def __init__(self, response: httpx.Response, end_at: float = math.inf) -> None:
        self._response = response
        self._end_at = end_at
        self.status = response.status_code
        self.headers = [(k, v) for k, v in response.headers.items()]

    async def read(self) -> bytes:
        """The whole body, by ``end_at``."""
        try:
            with trio.move_on_at(self._end_at):
                return await self._response.aread()
            raise UpstreamTimeout()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream response broke off: {type(exc).__name__}.") from exc

    def at_end(self) -> bool:
        """True when the body's end is known to be read (httpx does not tell early)."""
        return False

    async def chunks(self, first_alone: bool = False) -> AsyncIterator[bytes]:
        """The body as it arrives, piece by piece (so ``first_alone`` always holds).
        Close the iterator (``aclose``) when done with it."""
        try:
            async with aclosing(self._response.aiter_raw()) as raw:
                async for chunk in raw:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream stream broke off: {type(exc).__name__}.") from exc


def mock_answer(method: str, url: str, raw: bytes) -> tuple[int, list[tuple[str, str]],
                                                              list[bytes], float]:
    """The mock provider's answer: status, headers, body parts, the gap between parts."""
    _, tokens_per_s = mock.pacing(url)
    path = urlsplit(url).path
    created = int(time.time())
    json_headers = [("content-type", "application/json")]
    if method == "GET" and path.endswith("/models"):
        return 200, json_headers, [mock.models(created)], 0.0
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return 400, json_headers, [_mock_error("invalid JSON body")], 0.0
    model = str(body.get("model") or "mock-1")
    if path.endswith("/embeddings"):
        return 200, json_headers, [mock.embeddings(body, model)], 0.0
    if path.endswith("/chat/completions"):
        if body.get("stream") is True:
            gap = 1.0 / tokens_per_s if tokens_per_s else 0.0
            return 200, [("content-type", "text/event-stream")], \
                list(mock.chat_stream(body, model, created)), gap
        return 200, json_headers, [mock.chat_completion(body, model, created)], 0.0
    return 404, json_headers, [_mock_error(f"Unknown path {path}")], 0.0


def _mock_error(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": None}})


class MockResponse:
    """The mock provider's answer in process, for the native transport."""
    __slots__ = ("status", "headers", "_parts", "_gap_s")

    def __init__(self, status: int, headers: list[tuple[str, str]], parts: list[bytes],
                 gap_s: float) -> None:
        self.status, self.headers, self._parts, self._gap_s = status, headers, parts, gap_s

    async def read(self) -> bytes:
        return b"".join(self._parts)

    def at_end(self) -> bool:
        return False

    async def chunks(self, first_alone: bool = False) -> AsyncIterator[bytes]:
        for i, part in enumerate(self._parts):
            if i and self._gap_s:
                await trio.sleep(self._gap_s)
            yield part


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
        latency_s, _ = mock.pacing(str(request.url))
        if latency_s:
            await trio.sleep(latency_s)
        status, headers, parts, gap = mock_answer(request.method, str(request.url),
                                                  await request.aread())
        return httpx.Response(status, headers=headers, stream=_MockStream(parts, gap))


class Upstreams:
    """Both transports' pools, opened in app.py with ``async with``.

    ``transport`` is the deployment's: "native" (the lean trio + h11 pool in
    ``gwcore.transport``, the default) or "httpx".  A native deployment whose origin an
    HTTP(S)_PROXY / ALL_PROXY variable applies to (and NO_PROXY does not exempt) goes
    through httpx, which speaks to proxies, so setting a proxy is honoured either way.
    """

    def __init__(self, *, max_connections: int = 1000, keepalive: int = 200) -> None:
        self.native = NativePools(max_connections=max_connections, max_idle=keepalive)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=keepalive, keepalive_expiry=60)
        self._proxied: dict[str, bool] = {}
        self.requests_total = 0

    async def __aenter__(self) -> "Upstreams":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.native.close()
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

    def _needs_proxy(self, url: str) -> bool:
        proxied = self._proxied.get(url)
        if proxied is None:
            if len(self._proxied) > 4096:
                self._proxied.clear()
            proxied = self._proxied[url] = self._origin_needs_proxy(url)
        return proxied

    def _origin_needs_proxy(self, url: str) -> bool:
        parts = urlsplit(url)
        proxies = urllib.request.getproxies_environment()
        proxied = bool(proxies.get(parts.scheme) or proxies.get("all")) and \
            not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)
        if proxied:
            log.info("upstream %s://%s goes through the egress proxy (httpx transport)",
                     parts.scheme, parts.netloc)
        return proxied

    def statistics(self) -> dict[str, int]:
        return {"upstream_clients": len(self._clients),
                "upstream_requests_total": self.requests_total, **self.native.statistics()}

    def open(self, req: UpstreamRequest, timeouts: Timeouts,
             transport: str = "native") -> AbstractAsyncContextManager[Any]:
        """``async with upstreams.open(...) as response``: ``status``, ``headers``
        (lower-case str pairs), ``await read()``, ``async for chunk in chunks()``."""
        self.requests_total += 1
        if transport == "native":
            if req.url.startswith("mock:"):
                return _open_mock(req, timeouts.first_byte_at)
            if not self._needs_proxy(req.url):
                return self.native.exchange(req.method, req.url, req.headers, req.body,
                                            timeouts.connect_s, timeouts.read_s,
                                            timeouts.first_byte_at, timeouts.end_at)
        return self._open_httpx(req, timeouts)

    @asynccontextmanager
    async def _open_httpx(self, req: UpstreamRequest,
                          timeouts: Timeouts) -> AsyncIterator[UpstreamResponse]:
        client = self._client(req.url)
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s,
                                write=timeouts.read_s, pool=timeouts.connect_s)
        request = client.build_request(req.method, req.url, headers=req.headers,
                                       content=req.body or None, timeout=timeout)
        response = None
        try:
            with trio.move_on_at(timeouts.first_byte_at):
                response = await client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise UpstreamUnavailable("Connecting to the upstream timed out.") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout() from exc
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise UpstreamUnavailable("The upstream could not be reached.") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The upstream request failed: {type(exc).__name__}.") from exc
        if response is None:  # first_byte_at passed
            raise UpstreamTimeout()
        try:
            yield UpstreamResponse(response, timeouts.end_at)
        finally:
            # Closing a half-read response drops the upstream connection (no drain), so
            # this is quick; the bound keeps a wedged socket from holding us.
            with trio.move_on_after(2, shield=True):
                await response.aclose()


@asynccontextmanager
async def _open_mock(req: UpstreamRequest, first_byte_at: float) -> AsyncIterator[MockResponse]:
    latency_s, _ = mock.pacing(req.url)
    if latency_s:
        with trio.move_on_at(first_byte_at) as scope:
            await trio.sleep(latency_s)
        if scope.cancelled_caught:
            raise UpstreamTimeout()
    yield MockResponse(*mock_answer(req.method, req.url, req.body))
