"""A mock Anthropic upstream that speaks the Messages API's real wire format.

How this works: `MockAnthropic` is a `MockOpenAI` (tests/support/mock_openai.py) with
the Anthropic parts swapped in.  The server plumbing is inherited unchanged: one trio
task per connection, h11 for requests, keep-alive, EOF watching that counts abandoned
responses, pacing of token events, the knobs and the observations.  What differs is
decided in sync code, as in the OpenAI mock: `_decide` answers `POST /v1/messages`
with a `_Message` plan (a `_Chat` whose `completion()` is an Anthropic Message and
whose `events()` are Anthropic stream events), errors are Anthropic's
`{"type": "error", "error": {...}}`, and the response head carries `request-id`.

Per request (after the inherited hang / healthz handling):

    request                                  answer
    forced `status` knob                     that status, Anthropic error body
    not POST /v1/messages                    404 not_found_error
    no x-api-key and no Bearer token         401 authentication_error
    no anthropic-version header              400 invalid_request_error
    model / max_tokens / messages missing    400 invalid_request_error ("max_tokens: Field required")
    tools, and the last user text says
      "call a tool" (or tool_choice any/tool) a text block, then a tool_use block
    otherwise                                the `reply`, cut at max_tokens

The SDK 2.x sends its key as `Authorization: Bearer` (and `anthropic-version:
2026-10-21`); the gateway sends `x-api-key` and `2023-06-01`; both are accepted.

Usage is deterministic: input tokens are the characters of the system and message
texts / 4 (at least 1), an output token per streamed word (or argument fragment).
Prompt caching is modelled: the system blocks up to the last one marked
`cache_control` are the cached prefix; the first request with a given prefix reports
it as `cache_creation_input_tokens`, later ones as `cache_read_input_tokens`, and
`input_tokens` counts the rest (as Anthropic does: the three add up to the input).

Formats follow https://docs.anthropic.com/en/api/messages, .../messages-streaming and
.../errors, checked against the `anthropic` SDK's types (`types/message.py`,
`raw_message_stream_event.py`, `usage.py`, `shared/error_response.py`).
"""

from __future__ import annotations

import functools
import hashlib
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import h11
import orjson
import trio

# The server plumbing and the plan/answer shapes are the OpenAI mock's; the private
# names are shared on purpose (one mock server, two wire formats).
from tests.support.mock_openai import (
    _REASONS,
    TOOL_ARGUMENT_FRAGMENT_CHARS,
    MockOpenAI,
    _Answer,
    _Chat,
    _placeholder,
    _random_id,
    reply_words,
)

__all__ = ["DEFAULT_REPLY", "MockAnthropic", "TOOL_PREAMBLE", "cache_prefix", "input_tokens_for",
           "serve_mock_anthropic"]

DEFAULT_REPLY = "Hello! This is a mock reply from the Anthropic upstream."
# The text Claude typically writes before a tool call, here a fixed one.
TOOL_PREAMBLE = "I'll call the tool."

# status -> (error.type, error.message), after the bodies api.anthropic.com sends.
_FORCED_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (forced by the mock upstream)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: mock-missing"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def input_tokens_for(req: dict[str, Any]) -> int:
    """All input tokens (cached ones included): system and message text characters / 4, at least 1."""
    chars = len(_text_of(req.get("system"))) + sum(
        len(_text_of(m.get("content"))) for m in req.get("messages") or [] if isinstance(m, dict)
    )
    return max(1, chars // 4)


def cache_prefix(req: dict[str, Any]) -> str:
    """The text of the system blocks up to the last one marked `cache_control` ("" if none)."""
    system = req.get("system")
    if not isinstance(system, list):
        return ""
    marked = [i for i, b in enumerate(system) if isinstance(b, dict) and b.get("cache_control")]
    return _text_of(system[: marked[-1] + 1]) if marked else ""


def _error_body(type_: str, message: str, request_id: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id})


@dataclass(slots=True)
class _Message(_Chat):
    """What to answer to one Messages request; `events()` / `completion()` in Anthropic's format."""

    system_chars: int = 0
    cache_read: int = 0
    cache_write: int = 0
    tool_id: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)
    preamble: tuple[str, ...] = ()

    def _fragments(self) -> list[str]:
        args = orjson.dumps(self.tool_input).decode()
        step = TOOL_ARGUMENT_FRAGMENT_CHARS
        return [args[i : i + step] for i in range(0, len(args), step)]

    @property
    def output_tokens(self) -> int:
        if self.tool_name is None:
            return len(self.words)
        return len(self.preamble) + len(self._fragments())

    def _usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _blocks(self) -> list[dict[str, Any]]:
        if self.tool_name is None:
            return [{"type": "text", "text": "".join(self.words)}]
        return [
            {"type": "text", "text": "".join(self.preamble)},
            {"type": "tool_use", "id": self.tool_id, "name": self.tool_name, "input": self.tool_input},
        ]

    def completion(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": self._blocks(),
                "stop_reason": self.finish_reason,
                "stop_sequence": None,
                "usage": self._usage(self.output_tokens),
            }
        )

    def events(self) -> list[tuple[bool, bytes]]:
        """The stream as Anthropic sends it, each event flagged True if it is a paced token."""

        def event(data: dict[str, Any]) -> bytes:
            return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        start = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": self._usage(1),
        }
        out = [(False, event({"type": "message_start", "message": start}))]
        text_pieces = self.words if self.tool_name is None else self.preamble
        out.append((False, event({"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}})))
        out.append((False, event({"type": "ping"})))
        for piece in text_pieces:
            delta = {"type": "text_delta", "text": piece}
            out.append((True, event({"type": "content_block_delta", "index": 0, "delta": delta})))
        out.append((False, event({"type": "content_block_stop", "index": 0})))
        if self.tool_name is not None:
            block = {"type": "tool_use", "id": self.tool_id, "name": self.tool_name, "input": {}}
            out.append((False, event({"type": "content_block_start", "index": 1, "content_block": block})))
            # Anthropic opens the input with an empty fragment, then streams the JSON.
            for fragment in ["", *self._fragments()]:
                delta = {"type": "input_json_delta", "partial_json": fragment}
                out.append((bool(fragment), event({"type": "content_block_delta", "index": 1, "delta": delta})))
            out.append((False, event({"type": "content_block_stop", "index": 1})))
        usage = self._usage(self.output_tokens)
        del usage["cache_creation"], usage["service_tier"]  # message_delta's usage: the cumulative counts
        out.append((False, event({"type": "message_delta",
                                  "delta": {"stop_reason": self.finish_reason, "stop_sequence": None},
                                  "usage": usage})))
        out.append((False, event({"type": "message_stop"})))
        return out


def _pick_tool(req: dict[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in req.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if not tools:
        return None
    choice = req.get("tool_choice") if isinstance(req.get("tool_choice"), dict) else {}
    kind = choice.get("type")
    if kind == "none":
        return None
    if kind == "tool":
        return next((t for t in tools if t["name"] == choice.get("name")), tools[0])
    if kind == "any":
        return tools[0]
    users = [m for m in req["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    last = users[-1].get("content") if users else None
    if isinstance(last, list):  # the text blocks, tool results' text included
        last = [b for b in last if isinstance(b, dict) and b.get("type") == "text"]
    return tools[0] if "call a tool" in _text_of(last).lower() else None


def _input_for(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("input_schema") if isinstance(tool.get("input_schema"), dict) else {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return {name: _placeholder(properties.get(name)) for name in required if isinstance(name, str)}


class MockAnthropic(MockOpenAI):
    """A MockOpenAI that speaks Anthropic: the same knobs and observations.

    Knobs: status, error_body, retry_after, hang, first_byte_delay_s, latency_s,
      tokens_per_s, reply, record.  Observations: requests, counts, streams_started,
      streams_completed, streams_aborted, aborted, connections_open, errors, and
      `cached_prefixes` (the prompt-cache model).
    `base_url` has no `/v1` (the Anthropic SDK's and the gateway's convention).
    """

    def reset(self) -> None:
        super().reset()
        self.reply = DEFAULT_REPLY
        self.cached_prefixes: set[str] = set()
        self._headers: dict[bytes, bytes] = {}

    @property
    def base_url(self) -> str:
        return self.origin

    # -- deciding (sync) ------------------------------------------------------

    async def _respond(self, peer: Any, request: h11.Request, body: bytes, close: bool) -> bool:
        # `_decide` gets no headers; the inherited `_respond` calls it before its first
        # checkpoint, so the headers stashed here are this request's (trio switches
        # tasks only at an await).
        self._headers = {name.lower(): value for name, value in request.headers}
        return await super()._respond(peer, request, body, close)

    def _error(
        self, status: int, type_: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> _Answer:
        return _Answer(status, _error_body(type_, message, self._next_id("req_")), headers)

    def _forced_error(self) -> _Answer:
        assert self.status is not None
        headers = [(b"retry-after", self.retry_after.encode("latin-1"))] if self.retry_after is not None else []
        default = ("invalid_request_error" if self.status < 500 else "api_error", "Forced error.")
        type_, message = _FORCED_ERRORS.get(self.status, default)
        if self.error_body is not None:
            return _Answer(self.status, self.error_body, headers)
        return self._error(self.status, type_, message, headers)

    def _decide(self, method: bytes, route: str, path: str, body: bytes) -> tuple[_Chat | _Answer, bool]:
        if self.status is not None:
            return self._forced_error(), False
        if method != b"POST" or route != "/messages":
            return self._error(404, "not_found_error", f"Not found: {method.decode('latin-1')} {path}"), False
        headers = self._headers
        if not headers.get(b"x-api-key") and not headers.get(b"authorization", b"").startswith(b"Bearer "):
            return self._error(401, "authentication_error", "x-api-key header is required"), False
        if not headers.get(b"anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version: header is required"), False
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = "There was an error parsing the body of your request."
            return self._error(400, "invalid_request_error", message), False
        if not isinstance(req, dict):
            return self._error(400, "invalid_request_error", "The request body must be a JSON object."), False
        for name in ("model", "max_tokens", "messages"):
            if name not in req:
                return self._error(400, "invalid_request_error", f"{name}: Field required"), False
        max_tokens, messages = req["max_tokens"], req["messages"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            return self._error(400, "invalid_request_error", "max_tokens: Input should be a valid integer"), False
        if not isinstance(messages, list) or not messages:
            return self._error(400, "invalid_request_error", "messages: at least one message is required"), False
        plan = self._plan_message(req)
        return plan, plan.stream

    def _plan_message(self, req: dict[str, Any]) -> _Message:
        total = input_tokens_for(req)
        prefix = cache_prefix(req)
        cached = min(total, len(prefix) // 4) if prefix else 0
        key = hashlib.sha256(prefix.encode()).hexdigest()
        seen = key in self.cached_prefixes
        if prefix:
            self.cached_prefixes.add(key)
        plan = _Message(
            id=self._next_id("msg_"),
            created=int(time.time()),
            model=str(req["model"]),
            n=1,
            prompt_tokens=total - cached,
            words=(),
            finish_reason="end_turn",
            stream=req.get("stream") is True,
            cache_read=cached if seen else 0,
            cache_write=0 if seen else cached,
        )
        tool = _pick_tool(req)
        if tool is not None:
            plan.tool_name = tool["name"]
            plan.tool_id = "toolu_" + _random_id(24)
            plan.tool_input = _input_for(tool)
            plan.preamble = reply_words(TOOL_PREAMBLE)
            plan.finish_reason = "tool_use"
            return plan
        words = reply_words(self.reply)
        if req["max_tokens"] < len(words):
            words, plan.finish_reason = words[: req["max_tokens"]], "max_tokens"
        plan.words = words
        return plan

    def _head(
        self, status: int, content_type: bytes, started: float, length: int | None, close: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        """A response head as api.anthropic.com sends it (`request-id`); chunked if no length."""
        parts = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nrequest-id: %s\r\n"
            % (status, _REASONS.get(status, b""), content_type, self._next_id("req_").encode("ascii"))
        ]
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif not close:
            parts.append(b"transfer-encoding: chunked\r\n")
        if close:
            parts.append(b"connection: close\r\n")
        for name, value in extra or ():
            parts.append(name + b": " + value + b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


@asynccontextmanager
async def serve_mock_anthropic(host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> AsyncIterator[MockAnthropic]:
    """Serve a MockAnthropic on (host, port) in the current trio run; port 0 picks a free one."""
    mock = MockAnthropic(host=host, port=port, **knobs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, mock._serve_connection, port, host=host))
        mock.port = listeners[0].socket.getsockname()[1]
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()
