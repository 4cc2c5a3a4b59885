"""One request's way to an upstream and back: route, attempts, retries, fallbacks.

How this works: a model name resolves to a ``Route``.  ``_attempt`` walks the route and
then its fallbacks: for each, up to ``retries + 1`` tries, each on the deployment the
router picks (healthy, not yet tried by this request, weighted, least busy).  A try
that fails with a retryable error (connect error, timeout, 429, 500, 502, 503, 504)
moves on after a backoff (exponential with full jitter, or the upstream's
``retry-after`` when it gives one); other errors end the request at once, except a
context-window error on a route with ``fallback_on_context_window``, which goes to the
fallbacks.  A try succeeds when the answer is good as far as it was read inside the
try: a whole answer (``_try_whole``: exchange and body within the attempt's deadlines,
then parsed) or, for a stream (``_try``), its first event; a stream's response stays open
for the relay.

The hub format is OpenAI chat: every adapter (``gwcore.providers.*``) turns an OpenAI
request into its API's request and its answers back.  A ``Call`` carries the request
as the client sent it (``api``: "openai" or "anthropic") and lazily its OpenAI form;
an Anthropic-ingress call to an Anthropic deployment is passed through untranslated.

For streams, nothing is retried once a byte of the upstream's answer has been sent to
the client; after that an error is a final SSE error event.  While a stream waits for
its first event, ``: ping`` comments go out every ``stream_keepalive_s`` (written by
the server's watcher for the stream); the first ping commits the 200 head, so a long
wait costs reporting a later failure as an SSE error event instead of an HTTP status.
The relay writes the head with the first events, and the last events with the end of
the stream, when the upstream sent them together: a stream that arrived whole goes out
in one write.
"""
from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson
import trio

import gwnative as native
from gwcore.config import Deployment
from gwcore.errors import (GatewayError, InvalidRequest, ModelNotFound, UpstreamError,
                           UpstreamTimeout, UpstreamUnavailable)
from gwcore.providers import openai as openai_provider
from gwcore.providers import registry
from gwcore.providers.base import UpstreamRequest
from gwcore.routing import DeploymentHealth, Route, Router, clamp_timeout
from gwcore.upstream import Timeouts, Upstreams, UpstreamResponse
from gwcore.wire import (RESPONSES_FINAL, Usage, openai_usage, responses_event,
                         responses_usage)
from gwnative.errors import SSEError

# 529: Anthropic's "overloaded".
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})
# Backoff: 0.1 s doubling per retry, capped at 2 s, with full jitter (AWS architecture
# blog, "Exponential Backoff And Jitter"); a retry-after longer than MAX_RETRY_AFTER_S
# is not waited for: the error goes to the client instead.
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0
MAX_RETRY_AFTER_S = 10.0
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
    key: Any = None                # the caller's auth.KeyInfo, once known
    user: str | None = None        # the request's end-user id (OpenAI "user")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Call:
    """A request on its way: as the client sent it, and (lazily) in hub format."""
    kind: str                      # "chat" | "embeddings" | "responses"
    body: dict[str, Any]           # as the client sent it
    api: str = "openai"            # the client's API: "openai" | "anthropic"
    stream: bool = False
    timeout_hint: bytes | None = None
    raw: bytes = b""               # the body's bytes as sent (forwarded when unchanged)
    _hub: dict[str, Any] | None = None

    def hub(self) -> dict[str, Any]:
        """The OpenAI chat form of this request (translated once, on first use)."""
        if self._hub is None:
            if self.api == "anthropic":
                self._hub = registry.adapter("anthropic").ingress_to_openai(self.body)
            else:
                self._hub = self.body
        return self._hub

    def client_wants_usage(self) -> bool:
        if self.api != "openai":
            return True
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class Attempt:
    resp: UpstreamResponse
    ureq: UpstreamRequest
    dep: Deployment
    route: Route
    health: DeploymentHealth
    passthrough: bool  # the upstream speaks the client's API: no translation


Prime = Callable[[Attempt, AsyncExitStack], Awaitable[None]]
T = TypeVar("T")
Try = Callable[["Call", Route, int, "Outcome"], Awaitable[T]]


class _Failure(Exception):
    def __init__(self, error: GatewayError, retryable: bool) -> None:
        self.error = error
        self.retryable = retryable


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

    def _chain(self, route: Route) -> list[Route]:
        if not route.fallbacks:
            return [route]
        chain, seen = [route], {route.name}
        for name in route.fallbacks:
            fb = self.router.resolve(name)
            if fb is not None and name not in seen:
                seen.add(name)
                chain.append(fb)
        return chain

    async def _backoff(self, retry: int, error: GatewayError) -> bool:
        """Wait before the next try; False when the error says not to retry."""
        after = _retry_after(error)
        if after is not None:
            if after > MAX_RETRY_AFTER_S:
                return False
            await trio.sleep(after)
            return True
        await trio.sleep(self.rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** retry)))
        return True

    async def _attempt(self, call: Call, route: Route, out: Outcome, one_try: "Try[T]") -> T:
        """The result of the first try that succeeds: ``one_try(call, route, index,
        out)`` is ``_try_whole`` (a whole answer) or a ``_try`` that keeps a stream open.
        A try raises ``_Failure``, retryable or not."""
        last: GatewayError | None = None
        tries = 0
        for r in self._chain(route):
            tried: set[int] = set()
            for _ in range(r.retries + 1):
                if len(tried) == len(r.deployments):
                    tried.clear()  # every deployment had its turn: retry them
                index = self.router.pick(r, trio.current_time(), self.rng, tried)
                if index is None:
                    break  # all open (cooling down): on to the fallbacks
                if last is not None and not await self._backoff(tries - 1, last):
                    raise last
                tries += 1
                tried.add(index)
                try:
                    return await one_try(call, r, index, out)
                except _Failure as failure:
                    last = failure.error
                    if failure.retryable:
                        continue
                    if r.fallback_on_context_window and _is_context_window(last):
                        break
                    raise last from None
        if tries == 0:
            # Every deployment is cooling down: rather than refuse, try the one whose
            # cooldown ends first (a breaker must not turn a blip into an outage).
            index = self.router.last_resort(route, set())
            if index is not None:
                try:
                    return await one_try(call, route, index, out)
                except _Failure as failure:
                    last = failure.error
        raise last or UpstreamUnavailable()

    async def _try_whole(self, call: Call, r: Route, index: int,
                         out: Outcome) -> tuple[bytes | Any, Deployment]:
        """One try for a whole (unstreamed) answer: the exchange and the body within two
        deadlines (the first-byte timeout until the head, and ``timeout_s``, the
        deployment's total per attempt, from the request's start to the end of the
        body), which every transport keeps itself, the connection back in its pool
        before the answer is parsed.  An answer that is not valid after a 200 (an HTML
        page, a truncated body) fails the try like a 502."""
        dep, ureq, passthrough, timeout_s, first_byte_s, health, start = \
            self._begin(call, r, index, out)
        error: GatewayError
        status = 0
        try:
            async with self.upstreams.open(
                    ureq, Timeouts(connect_s=min(r.connect_timeout_s, first_byte_s),
                                   read_s=timeout_s, first_byte_at=start + first_byte_s,
                                   end_at=start + timeout_s),
                    self.router.transport(dep)) as resp:
                data = await resp.read()
            status = resp.status
            if status == 200:
                status = 0  # a failure from here on is the upstream's (retryable)
                answer = self._parse(call, dep, passthrough, data, out)
                self.router.succeeded(health, r)
                return answer, dep
            error = registry.adapter(dep.provider).map_error(status, data, resp.headers)
        except (UpstreamUnavailable, UpstreamTimeout, UpstreamError) as exc:
            error = exc
        finally:
            self.router.finished(health)
        raise self._failed(error, status, health, r)

    def _begin(self, call: Call, r: Route, index: int, out: Outcome
               ) -> tuple[Deployment, UpstreamRequest, bool, float, float, DeploymentHealth,
                          float]:
        """What a try of either kind starts with: its deployment, the request for it
        (and whether it passes through untranslated), its total and first-byte
        timeouts, the router's note that it is under way, and when it started."""
        dep = r.deployments[index]
        out.attempts += 1
        out.provider, out.upstream_model = dep.provider, dep.model
        ureq, passthrough = self._build(call, dep)
        timeout_s = clamp_timeout(dep.timeout_s or r.timeout_s, call.timeout_hint)
        first_byte_s = min(r.first_byte_timeout_s or timeout_s, timeout_s)
        now = trio.current_time()
        return dep, ureq, passthrough, timeout_s, first_byte_s, \
            self.router.started(r, index, now), now

    def _failed(self, error: GatewayError, status: int, health: DeploymentHealth,
                r: Route) -> "_Failure":
        retryable = status == 0 or status in RETRYABLE_STATUS
        if retryable:
            self.router.failed(health, r, trio.current_time())
        return _Failure(error, retryable)

    async def _try(self, call: Call, r: Route, index: int, out: Outcome,
                   stack: AsyncExitStack, prime: "Prime") -> Attempt:
        """One try for a stream: the first event read (``prime``) inside the try, the
        response left open in ``stack`` for the relay."""
        dep, ureq, passthrough, timeout_s, first_byte_s, health, _ = \
            self._begin(call, r, index, out)
        attempt = AsyncExitStack()
        attempt.callback(self.router.finished, health)
        error: GatewayError
        status = 0
        try:
            resp = None
            # move_on_after, not fail_after: a bare cancel scope, no generator.
            with trio.move_on_after(first_byte_s):
                resp = await attempt.enter_async_context(self.upstreams.open(
                    ureq, Timeouts(connect_s=min(r.connect_timeout_s, first_byte_s),
                                   read_s=timeout_s), self.router.transport(dep)))
            if resp is None:
                raise UpstreamTimeout()
            status = resp.status
            if status == 200:
                a = Attempt(resp, ureq, dep, r, health, passthrough)
                status = 0  # a failure from here on is the upstream's (retryable)
                await prime(a, attempt)
                self.router.succeeded(health, r)
                stack.push_async_exit(attempt.pop_all())
                return a
            data = None
            with trio.move_on_after(timeout_s):
                data = await resp.read()
            if data is None:
                raise UpstreamTimeout()
            error = registry.adapter(dep.provider).map_error(status, data, resp.headers)
        except (UpstreamUnavailable, UpstreamTimeout, UpstreamError) as exc:
            error = exc
        finally:
            await attempt.aclose()
        raise self._failed(error, status, health, r)

    def _build(self, call: Call, dep: Deployment) -> tuple[UpstreamRequest, bool]:
        base = self.router.base_url(dep)
        key = self.router.api_key(dep)
        if call.kind == "embeddings" or call.kind == "responses":
            if dep.provider not in registry.OPENAI_FAMILY:
                raise InvalidRequest(f"'{call.kind}' is only served by OpenAI-compatible "
                                     f"deployments; this model routes to {dep.provider}.",
                                     code="unsupported_endpoint", param="model")
            build = (openai_provider.build_embeddings if call.kind == "embeddings"
                     else openai_provider.build_responses)
            return build(call.body, dep, base, key, call.raw), True
        if call.api == "anthropic" and dep.provider == "anthropic":
            return registry.adapter("anthropic").build_passthrough(call.body, dep, base, key), True
        if call.api == "openai" and dep.provider in registry.OPENAI_FAMILY:
            return openai_provider.build_chat(call.body, dep, base, key, call.raw), True
        adapter = registry.adapter(dep.provider)
        return adapter.build_chat(call.hub(), dep, base, key), False

    # -- non-streaming ------------------------------------------------------------
    async def forward(self, call: Call, route: Route,
                      out: Outcome) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """A whole answer in the client's API format, and the headers to add."""
        answer, dep = await self._attempt(call, route, out, self._try_whole)
        return answer, _gateway_headers(dep)

    def _parse(self, call: Call, dep: Deployment, passthrough: bool, data: bytes,
               out: Outcome) -> bytes | Any:
        """The upstream's 200 answer in the client's API; UpstreamError when it is not
        a valid answer (an HTML error page with a 200, a truncated body)."""
        adapter = registry.adapter(dep.provider)
        if call.kind == "responses" or passthrough:
            _check_json_object(data)
            if call.kind == "responses":
                out.usage = responses_usage(data)
            elif dep.provider in registry.OPENAI_FAMILY:
                out.usage = openai_usage(data)
            else:
                out.usage = adapter.usage_of(data)
            return data
        hub, out.usage = adapter.parse_chat(data, dep.model, int(time.time()))
        if call.api == "anthropic":
            return registry.adapter("anthropic").openai_to_ingress(hub, call.body.get("model"))
        return hub

    # -- streaming ----------------------------------------------------------------
    async def stream(self, call: Call, route: Route, responder: Any, out: Outcome,
                     sse_headers: list[tuple[bytes, bytes]],
                     observe: Callable[[str], None] | None = None) -> None:
        """Stream an answer to ``responder`` (a server Responder) in the client's API.

        ``observe`` sees the data of every OpenAI-format chunk (the cache assembles
        answers from it).  The responder's watcher pings while the first event is
        awaited; the head then goes out with the first events in one write, and the
        last events with the stream's end when the upstream's end is already read.
        """
        parser: Any = None
        relay: _Relay | None = None
        first: list[bytes] = []
        chunks: AsyncIterator[bytes] | None = None

        async def prime(a: Attempt, attempt: AsyncExitStack) -> None:
            """Read up to the first event; an upstream that breaks off, sends garbage or
            ends before any event fails this try (and is retried or failed over)."""
            nonlocal parser, relay, chunks
            parser = native.SSEParser()
            relay = _Relay(call, a, observe)
            first.clear()
            # An idle worker sends the first event before it decodes the rest; a busy
            # one relays what arrived together in one write (Responder.alone).
            chunks = a.resp.chunks(first_alone=responder.alone)
            attempt.push_async_callback(chunks.aclose)  # type: ignore[attr-defined]
            try:
                async for chunk in chunks:
                    first.append(relay.feed(parser.feed(chunk)))
                    if relay.events:
                        return
            except SSEError as exc:
                raise UpstreamError(f"The upstream sent a malformed stream: {exc}") from exc
            raise UpstreamError("The upstream ended the stream without sending an event.")

        responder.watch(self.stream_keepalive_s, sse_headers, PING)
        async with AsyncExitStack() as stack:
            a: Attempt | None = None
            error: GatewayError | None = None
            started = trio.current_time()
            try:
                a = await self._attempt(call, route, out,
                                        lambda c, r, i, o: self._try(c, r, i, o, stack, prime))
            except GatewayError as exc:
                error = exc
            responder.stop_pings()
            if error is not None and not responder.started:
                raise error
            out.ttft_s = trio.current_time() - started
            try:
                await self._relay(a, chunks, first, error, parser, relay, call, responder,
                                  out, sse_headers)
            finally:
                # Recorded even when the client leaves at the last moment (SDKs close
                # right after [DONE]), so the usage is always accounted.
                if relay is not None:
                    out.usage = relay.usage

    async def _relay(self, a: Attempt | None, chunks: AsyncIterator[bytes] | None,
                     first: list[bytes], error: GatewayError | None, parser: Any,
                     relay: "_Relay | None", call: Call, responder: Any, out: Outcome,
                     sse_headers: list[tuple[bytes, bytes]]) -> None:
        """Send the stream on from its first event, ending complete or with an error
        event.  (An ``error`` here came after a ping committed the head.)"""
        pending = b""
        # The head's headers, for a head not yet committed by a ping (then a is set).
        head = sse_headers + _gateway_headers(a.dep) if a is not None else sse_headers
        try:
            if error is not None:
                raise error
            assert a is not None and chunks is not None and relay is not None
            pending = b"".join(first)
            resp = a.resp
            if not resp.at_end():
                if not responder.started:
                    await responder.start_stream(200, head, pending)
                else:
                    await responder.send_chunk(pending)
                pending = b""
                async for chunk in chunks:
                    data = relay.feed(parser.feed(chunk))
                    if data:
                        if resp.at_end():
                            pending = data  # goes with the end, in one write
                        else:
                            await responder.send_chunk(data)
            # else the whole stream is read already: it all goes out in one write
            parser.close()
            pending += relay.close(truncated=parser.truncated)
        except GatewayError as exc:
            out.error_code = exc.code
            pending += _error_event(call, exc.message, exc.type, exc.code)
        except SSEError as exc:
            out.error_code = "upstream_error"
            pending += _error_event(call, f"The upstream sent a malformed stream: {exc}",
                                    "api_error", "upstream_error")
        if not responder.started:
            await responder.start_stream(200, head, pending, end=True)
        else:
            await responder.end_stream(pending)


class _Relay:
    """Upstream SSE events -> the frames the client gets, with usage on the way.

    OpenAI passthrough (the hot path) re-frames events as they are and only looks into
    the ones that mention usage; other upstreams go through their adapter's stream
    translator into OpenAI chunks; an Anthropic-ingress client then gets those turned
    into Anthropic events, unless the upstream is Anthropic itself (passed through).
    """

    __slots__ = ("call", "passthrough", "openai_family", "translator", "egress", "observe",
                 "usage", "events", "done", "strip_usage", "usage_reader", "responses")

    def __init__(self, call: Call, a: Attempt, observe: Callable[[str], None] | None) -> None:
        self.call = call
        self.observe = observe
        self.usage: Usage | None = None
        self.events = 0
        self.done = False
        self.openai_family = a.dep.provider in registry.OPENAI_FAMILY
        self.passthrough = a.passthrough
        self.strip_usage = not call.client_wants_usage()
        self.translator = None
        self.egress = None
        self.usage_reader = None
        self.responses = call.kind == "responses"
        created = int(time.time())
        if a.passthrough and not self.openai_family:
            # Anthropic ingress to an Anthropic upstream: events pass through untouched;
            # a translator reads them only for the usage.
            self.usage_reader = registry.adapter(a.dep.provider).StreamTranslator(
                a.dep.model, True, created)
        elif not a.passthrough:
            if not self.openai_family:
                self.translator = registry.adapter(a.dep.provider).StreamTranslator(
                    a.dep.model, True, created)
            if call.api == "anthropic":
                self.egress = registry.adapter("anthropic").IngressStreamTranslator(
                    call.body.get("model"))

    def feed(self, events: list[Any]) -> bytes:
        if not events:
            return b""
        out: list[bytes] = []
        for ev in events:
            self.events += 1
            if self.responses:
                # Responses API: passed through; the final event carries the usage.
                if '"response.' in ev.data:
                    kind, usage = responses_event(ev.data)
                    if kind in RESPONSES_FINAL:
                        self.done = True
                        self.usage = usage or self.usage
                out.append(native.encode_event(ev.data, ev.event or None, ev.id))
            elif self.usage_reader is not None:
                self.usage_reader.feed(ev)
                self.usage = self.usage_reader.usage
                self.done = self.usage_reader.done
                out.append(native.encode_event(ev.data, ev.event or None, ev.id))
            elif self.translator is None:
                self._openai_event(ev.data, ev.event, ev.id, out)
            else:
                for frame in self.translator.feed(ev):
                    self._openai_event(_frame_data(frame), "", None, out, frame)
                self.usage = self.translator.usage or self.usage
        return b"".join(out)

    def _openai_event(self, data: str, event: str, id_: str | None, out: list[bytes],
                      frame: bytes | None = None) -> None:
        if data == "[DONE]":
            self.done = True
        elif '"usage"' in data and '"usage":null' not in data:
            usage = openai_usage(data)
            if usage is not None:
                self.usage = usage
                if self.observe is not None:
                    self.observe(data)
                if self.egress is not None:
                    out.extend(self.egress.feed(data))
                    return
                if self.strip_usage and openai_provider.is_usage_only_chunk(data):
                    return
                out.append(frame or native.encode_event(data, event or None, id_))
                return
        if self.observe is not None:
            self.observe(data)
        if self.egress is not None:
            out.extend(self.egress.feed(data))
        else:
            out.append(frame or native.encode_event(data, event or None, id_))

    def close(self, *, truncated: bool) -> bytes:
        out: list[bytes] = []
        if self.translator is not None and hasattr(self.translator, "close"):
            for frame in self.translator.close():
                self._openai_event(_frame_data(frame), "", None, out, frame)
            self.usage = self.translator.usage or self.usage
        if truncated or not self.done:
            raise UpstreamError("The upstream stream ended before it was complete.")
        return b"".join(out)


def _frame_data(frame: bytes) -> str:
    """The data of a one-line ``data: ...\\n\\n`` frame, as adapters produce them."""
    return frame[6:-2].decode("utf-8")


def _error_event(call: Call, message: str, type_: str, code: str) -> bytes:
    if call.api == "anthropic":
        return native.encode_event(orjson.dumps(
            {"type": "error", "error": {"type": "api_error", "message": message}}), "error")
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


def _is_context_window(error: GatewayError) -> bool:
    text = f"{error.code} {error.message}".lower()
    return error.status == 400 and ("context_length" in text or "context window" in text
                                    or "too many tokens" in text or "prompt is too long" in text)


def _check_json_object(data: bytes) -> None:
    """UpstreamError unless ``data`` is a well-formed JSON object.  Decoding into an
    empty struct builds no Python objects but checks the whole text (and that its top
    level is an object): a cheap validity check for passthrough answers."""
    try:
        _json_object.decode(data)
    except msgspec.DecodeError:
        raise UpstreamError("The upstream answered 200 with a body that is not a JSON "
                            "object.") from None


class _Anything(msgspec.Struct):
    pass


_json_object = msgspec.json.Decoder(_Anything)


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
