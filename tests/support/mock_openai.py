"""A mock OpenAI upstream that speaks OpenAI's real wire format.

How this works: one trio task per TCP connection reads requests with h11
(head and body; keep-alive, pipelined bytes carried over to the next request).
Every answer is decided by plain sync functions from the parsed request and the
knobs on `MockOpenAI`, then written directly with as few `send_all` calls as
possible: a non-streaming answer is one write (head + body), a stream is one
write per SSE event (chunked, RFC 9112 section 7.1). The mock is independent of `gwcore` on purpose: it is the
reference the gateway is tested against, and the upstream it is benchmarked
against (`benchmarks/mock_upstream.py`).

Per response:

    state            event                                next
    read request     /healthz                             answer 200, keep-alive
    read request     knob hang                            watch the socket until EOF -> aborted, close
    read request     stream: true (chat, responses)       stream, watching the socket for EOF
    streaming        all events sent ([DONE] for chat)    completed, keep-alive
    streaming        EOF seen / send failed               aborted, close
    read request     a delay is configured                wait (watching for EOF), then answer
    read request     otherwise                            answer at once, keep-alive

Formats follow https://platform.openai.com/docs/api-reference/chat (objects
`chat.completion`, `chat.completion.chunk`), .../responses (object `response`
and its streaming events), .../embeddings and .../models, and were checked
against the official `openai` SDK's pydantic types
(`openai/types/chat/chat_completion_chunk.py`, `completion_usage.py`,
`types/responses/response.py`, `response_stream_event.py`, `response_usage.py`,
`lib/streaming/responses/_responses.py` for how the SDK accumulates a stream,
`lib/_parsing/_embeddings.py` for the base64 embedding decoding).

The Responses API (`POST /v1/responses`) answers the same `reply` (or a
`function_call` item, on the same trigger as chat tool calls). Its stream is one
SSE event per `event: <type>` / `data: {"type", "sequence_number", ...}` pair:

    event                                    carries
    response.created, response.in_progress   the response: in_progress, output [], usage null
    response.output_item.added               the message (or function_call) item, in_progress
    response.content_part.added              message: an empty output_text part
    response.output_text.delta               message: one per word (paced)
    response.output_text.done                message: the whole text
    response.content_part.done               message: the whole part
    response.function_call_arguments.delta   function_call: one per argument fragment (paced)
    response.function_call_arguments.done    function_call: the whole arguments
    response.output_item.done                the finished item
    response.completed                       the whole response with usage (response.incomplete
                                             instead when cut at max_output_tokens); no [DONE]
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import http
import itertools
import math
import os
import re
import struct
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import h11
import orjson
import trio

__all__ = [
    "DEFAULT_REPLY",
    "MODELS",
    "MockOpenAI",
    "Recorded",
    "embedding_base64",
    "embedding_for",
    "input_tokens_for",
    "prompt_tokens_for",
    "reply_words",
    "serve_mock_openai",
]

DEFAULT_REPLY = "Hello! This is a mock reply from the upstream."
EMBEDDING_DIMENSIONS = 8
# The shape of a real fingerprint: "fp_" and 10 hex digits.
SYSTEM_FINGERPRINT = "fp_6b68a8204b"
# (id, created, owned_by), as GET https://api.openai.com/v1/models lists them.
MODELS: tuple[tuple[str, int, str], ...] = (
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("gpt-3.5-turbo", 1677610602, "openai"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"),
)
# 64 KiB: one read takes a whole typical request, headers and body.
RECV_BYTES = 64 * 1024
# Argument fragments of a streamed tool call: OpenAI sends a few characters per chunk.
TOOL_ARGUMENT_FRAGMENT_CHARS = 8

_KNOB_DEFAULTS: dict[str, Any] = {
    "status": None,
    "error_body": None,
    "retry_after": None,
    "hang": False,
    "first_byte_delay_s": 0.0,
    "latency_s": 0.0,
    "tokens_per_s": 0.0,
    "reply": DEFAULT_REPLY,
    "record": True,
}

# status -> (error.type, error.code, error.message) for forced errors, after the
# bodies api.openai.com sends for them.
_FORCED_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (forced by the mock upstream)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
    ),
    403: ("permission_error", "unsupported_country_region_territory", "Country, region, or territory not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    409: ("invalid_request_error", None, "Conflict (forced by the mock upstream)."),
    422: ("invalid_request_error", None, "Unprocessable entity (forced by the mock upstream)."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("server_error", None, "Gateway timeout."),
}


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the mock received it."""

    method: str
    path: str  # without the query string, as sent (e.g. "/v1/chat/completions")
    headers: dict[str, str]  # names lowercased; repeated headers joined with ", "
    body: bytes
    json: Any | None  # the decoded body, None if empty or not JSON


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _forced_error_body(status: int) -> bytes:
    default = ("invalid_request_error" if status < 500 else "server_error", None, "Forced error.")
    type_, code, message = _FORCED_ERRORS.get(status, default)
    return _error_body(message, type_, code)


@functools.lru_cache(maxsize=64)
def reply_words(reply: str) -> tuple[str, ...]:
    """The reply cut into the pieces that are streamed: each word with the spaces after it.

    Concatenating the pieces gives `reply` exactly (leading spaces stay on the first piece).
    """
    pieces = re.findall(r"\S+\s*", reply)
    lead = reply[: len(reply) - len(reply.lstrip())]
    if pieces and lead:
        pieces[0] = lead + pieces[0]
    return tuple(pieces)


def _text_of(content: Any) -> str:
    """The text of a message's content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens_for(messages: list[Any]) -> int:
    """Deterministic prompt tokens: total characters of the message contents / 4, at least 1."""
    chars = sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    return max(1, chars // 4)


def embedding_for(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector for `text`, made of float32-exact values.

    float32-exact so the "float" format and the SDK's base64 (little-endian
    float32) decoding give the same Python floats.
    """
    raw = b"".join(
        hashlib.sha256(i.to_bytes(4, "little") + text.encode("utf-8")).digest()
        for i in range((2 * dimensions + 31) // 32)
    )
    values = [int.from_bytes(raw[2 * i : 2 * i + 2], "little") / 32767.5 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def embedding_base64(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> str:
    """`embedding_for(text)` as OpenAI's base64 encoding: little-endian float32."""
    vector = embedding_for(text, dimensions)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _random_id(length: int) -> str:
    return "".join(_ID_ALPHABET[b % 62] for b in os.urandom(length))


def _placeholder(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    return {"string": "mock", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(
        schema.get("type"), None
    )


def _arguments_for(function: dict[str, Any]) -> str:
    """JSON arguments for a tool call: a placeholder for each required parameter, else `{}`."""
    parameters = function.get("parameters")
    if not isinstance(parameters, dict):
        return "{}"
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    required = parameters.get("required") if isinstance(parameters.get("required"), list) else []
    arguments = {name: _placeholder(properties.get(name)) for name in required if isinstance(name, str)}
    return orjson.dumps(arguments).decode()


@dataclass(slots=True)
class _Chat:
    """What to answer to one chat completion request (the same for every choice)."""

    id: str
    created: int
    model: str
    n: int
    prompt_tokens: int
    words: tuple[str, ...]  # the content pieces (empty for a tool call)
    finish_reason: str
    tool_name: str | None = None
    tool_arguments: str = ""
    stream: bool = False
    include_usage: bool = False

    @property
    def completion_tokens(self) -> int:
        per_choice = len(self.words) if self.tool_name is None else len(self._fragments())
        return per_choice * self.n

    def _fragments(self) -> list[str]:
        args = self.tool_arguments
        step = TOOL_ARGUMENT_FRAGMENT_CHARS
        return [args[i : i + step] for i in range(0, len(args), step)] or [""]

    def completion(self) -> bytes:
        if self.tool_name is None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(self.words),
                "refusal": None,
                "annotations": [],
            }
        choices = []
        for index in range(self.n):
            if self.tool_name is not None:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_" + _random_id(24),
                            "type": "function",
                            "function": {"name": self.tool_name, "arguments": self.tool_arguments},
                        }
                    ],
                    "refusal": None,
                    "annotations": [],
                }
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": self.finish_reason})
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": _usage(self.prompt_tokens, self.completion_tokens),
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )

    def events(self) -> list[tuple[bool, bytes]]:
        """The SSE events of the stream, each flagged True if it is a token (paced) event."""
        head = orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        prefix = b"data: " + head[:-1] + b',"choices":['
        # With include_usage every chunk carries "usage": null, and one more chunk
        # with no choices carries the usage (API reference, stream_options).
        suffix = b'],"usage":null}\n\n' if self.include_usage else b"]}\n\n"

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return prefix + orjson.dumps(choice) + suffix

        events: list[tuple[bool, bytes]] = []
        if self.tool_name is None:
            events += [(False, chunk(i, {"role": "assistant", "content": "", "refusal": None})) for i in range(self.n)]
            for word in self.words:
                events += [(i == 0, chunk(i, {"content": word})) for i in range(self.n)]
        else:
            for i in range(self.n):
                call = {
                    "index": 0,
                    "id": "call_" + _random_id(24),
                    "type": "function",
                    "function": {"name": self.tool_name, "arguments": ""},
                }
                delta = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
                events.append((False, chunk(i, delta)))
            for fragment in self._fragments():
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                events += [(i == 0, chunk(i, delta)) for i in range(self.n)]
        events += [(False, chunk(i, {}, self.finish_reason)) for i in range(self.n)]
        if self.include_usage:
            usage = orjson.dumps(_usage(self.prompt_tokens, self.completion_tokens))
            events.append((False, prefix + b'],"usage":' + usage + b"}\n\n"))
        events.append((False, b"data: [DONE]\n\n"))
        return events


def _pick_tool(req: dict[str, Any]) -> dict[str, Any] | None:
    """The function to call, if the request has tools and asks for a call."""
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    functions = [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not functions:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        return next((f for f in functions if f.get("name") == wanted), functions[0])
    if choice == "required":
        return functions[0]
    messages = req["messages"]
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    return functions[0] if "call a tool" in _text_of(last.get("content")).lower() else None


def _int_param(req: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = req.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# -- the Responses API (POST /v1/responses) ------------------------------------

# The request parameters a Response object repeats, with what it says when the
# request left them out (or sent null). Dict defaults are merged with what was sent.
_RESPONSE_ECHO_DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": None,
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
}


def _item_text(item: Any) -> str:
    """The text of one Responses input item: a message's content, or a tool call's output."""
    if not isinstance(item, dict):
        return ""
    if "content" in item:
        return _text_of(item["content"])
    return _text_of(item.get("output"))  # function_call_output: a string or input_text parts


def input_tokens_for(input: Any, instructions: Any = None) -> int:
    """Deterministic input tokens of a Responses request, as `prompt_tokens_for` counts chat's:
    characters of the instructions and the input's texts / 4, at least 1."""
    chars = len(instructions) if isinstance(instructions, str) else 0
    if isinstance(input, str):
        chars += len(input)
    elif isinstance(input, list):
        chars += sum(len(_item_text(item)) for item in input)
    return max(1, chars // 4)


def _json_type(value: Any) -> str:
    """How OpenAI's validation errors name a JSON value's type."""
    if value is None:
        return "null"
    names = ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a decimal"), (list, "an array"))
    return next((name for type_, name in names if isinstance(value, type_)), "an object")


def _pick_function(req: dict[str, Any]) -> dict[str, Any] | None:
    """The function tool to call (`{type: "function", name, parameters}`), if the request asks for a call."""
    tools = req.get("tools")
    if not isinstance(tools, list):
        return None
    functions = [
        t for t in tools if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    if not functions:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return next((f for f in functions if f["name"] == choice.get("name")), functions[0])
    if choice == "required":
        return functions[0]
    raw = req["input"]
    last = raw if isinstance(raw, str) else _item_text(raw[-1])
    return functions[0] if "call a tool" in last.lower() else None


def _response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        # `cache_write_tokens` is a required field of the SDK's InputTokensDetails.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(slots=True)
class _Response(_Chat):
    """What to answer to one Responses API request; `completion()` is a Response object and
    `events()` its stream. A `_Chat` (n = 1) so that the server plumbing serves it unchanged:
    `prompt_tokens` are the input tokens, `finish_reason` "length" means incomplete, and
    `tool_name`, `tool_arguments` describe a function call."""

    echo: dict[str, Any] | None = None  # the repeated request parameters (_RESPONSE_ECHO_DEFAULTS' keys)
    item_id: str = ""  # the output item's: "msg_..." or "fc_..."
    call_id: str = ""  # a function call's "call_..."

    @property
    def _incomplete(self) -> bool:
        return self.finish_reason == "length"

    def _item(self, done: bool) -> dict[str, Any]:
        """The output item: in progress (nothing generated yet) or done."""
        status = ("incomplete" if self._incomplete else "completed") if done else "in_progress"
        if self.tool_name is not None:
            arguments = self.tool_arguments if done else ""
            return {
                "id": self.item_id,
                "type": "function_call",
                "status": status,
                "arguments": arguments,
                "call_id": self.call_id,
                "name": self.tool_name,
            }
        content = [self._part("".join(self.words))] if done else []
        return {"id": self.item_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def _response(self, done: bool) -> dict[str, Any]:
        status = ("incomplete" if self._incomplete else "completed") if done else "in_progress"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": [self._item(True)] if done else [],
            "service_tier": "default",
            **(self.echo or {}),
            "usage": _response_usage(self.prompt_tokens, self.completion_tokens) if done else None,
        }

    def completion(self) -> bytes:
        return orjson.dumps(self._response(True))

    def events(self) -> list[tuple[bool, bytes]]:
        """The SSE events of the stream, each flagged True if it is a token (paced) event."""
        sequence = itertools.count()

        def event(type_: str, **fields: Any) -> bytes:
            data = orjson.dumps({"type": type_, "sequence_number": next(sequence), **fields})
            return b"event: " + type_.encode("ascii") + b"\ndata: " + data + b"\n\n"

        at = {"item_id": self.item_id, "output_index": 0}
        events = [
            (False, event("response.created", response=self._response(False))),
            (False, event("response.in_progress", response=self._response(False))),
            (False, event("response.output_item.added", output_index=0, item=self._item(False))),
        ]
        if self.tool_name is None:
            text = "".join(self.words)
            events.append((False, event("response.content_part.added", **at, content_index=0, part=self._part(""))))
            events += [
                (True, event("response.output_text.delta", **at, content_index=0, delta=word, logprobs=[]))
                for word in self.words
            ]
            events.append((False, event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])))
            events.append((False, event("response.content_part.done", **at, content_index=0, part=self._part(text))))
        else:
            events += [
                (True, event("response.function_call_arguments.delta", **at, delta=fragment))
                for fragment in self._fragments()
            ]
            events.append((False, event("response.function_call_arguments.done", **at, arguments=self.tool_arguments)))
        events.append((False, event("response.output_item.done", output_index=0, item=self._item(True))))
        final = "response.incomplete" if self._incomplete else "response.completed"
        events.append((False, event(final, response=self._response(True))))
        return events


class _Answer:
    """A complete non-streaming answer."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


_MODELS_BODY = orjson.dumps(
    {"object": "list", "data": [{"id": m, "object": "model", "created": c, "owned_by": o} for m, c, o in MODELS]}
)
_HEALTHZ_BODY = b'{"status":"ok"}'
_BAD_JSON_BODY = _error_body(
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have "
    "trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
    "invalid_request_error",
    None,
)
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}


class MockOpenAI:
    """The state of one mock upstream: knobs that tests set, and what it observed.

    Knobs (plain attributes, read at the start of each request):
      status, error_body, retry_after, hang, first_byte_delay_s, latency_s,
      tokens_per_s, reply, record (False: do not keep `requests`; for benchmarks).
    Observations: requests, counts, streams_started, streams_completed,
      streams_aborted, aborted, connections_open, errors.
    """

    status: int | None
    error_body: bytes | None
    retry_after: str | None
    hang: bool
    first_byte_delay_s: float
    latency_s: float
    tokens_per_s: float
    reply: str
    record: bool

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.host = host
        self.port = port
        self.connections_open = 0
        self.reset()
        for name, value in knobs.items():
            if name not in _KNOB_DEFAULTS:
                raise TypeError(f"unknown MockOpenAI knob {name!r}; knobs are {sorted(_KNOB_DEFAULTS)}")
            setattr(self, name, value)
        self._ids = itertools.count()
        self._id_prefix = _random_id(12)

    def reset(self) -> None:
        """Knobs back to their defaults, observations cleared (open connections stay counted)."""
        for name, value in _KNOB_DEFAULTS.items():
            setattr(self, name, value)
        self.requests: list[Recorded] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.streams_started = 0
        self.streams_completed = 0
        # Responses the client abandoned before we finished sending them: streams,
        # but also hangs and delayed non-streaming answers (a client that timed out).
        self.streams_aborted = 0
        self.aborted = trio.Event()
        self.errors: list[Exception] = []  # unexpected exceptions in the mock itself

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def statistics(self) -> dict[str, int]:
        return {
            "requests": sum(self.counts.values()),
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_aborted": self.streams_aborted,
            "connections_open": self.connections_open,
        }

    # -- deciding (sync) ------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):017d}"

    def _forced_error(self) -> _Answer:
        assert self.status is not None
        headers = [(b"retry-after", self.retry_after.encode("latin-1"))] if self.retry_after is not None else []
        return _Answer(self.status, self.error_body or _forced_error_body(self.status), headers)

    def _plan_chat(self, req: Any) -> _Chat | _Answer:
        if not isinstance(req, dict):
            return _Answer(400, _error_body("The request body must be a JSON object.", "invalid_request_error", None))
        model, messages = req.get("model"), req.get("messages")
        if not isinstance(model, str) or not model:
            return _Answer(400, _error_body("you must provide a model parameter", "invalid_request_error", None))
        if not isinstance(messages, list) or not messages:
            message = "Missing required parameter: 'messages'."
            return _Answer(400, _error_body(message, "invalid_request_error", "missing_required_parameter", "messages"))
        n = _int_param(req, "n") or 1
        chat = _Chat(
            id=self._next_id("chatcmpl-"),
            created=int(time.time()),
            model=model,
            n=max(1, n),
            prompt_tokens=prompt_tokens_for(messages),
            words=(),
            finish_reason="stop",
            stream=req.get("stream") is True,
        )
        options = req.get("stream_options")
        chat.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        tool = _pick_tool(req)
        if tool is not None:
            chat.tool_name = str(tool.get("name", ""))
            chat.tool_arguments = _arguments_for(tool)
            chat.finish_reason = "tool_calls"
            return chat
        words = reply_words(self.reply)
        limit = _int_param(req, "max_completion_tokens", "max_tokens")
        if limit is not None and limit < len(words):
            words, chat.finish_reason = words[: max(0, limit)], "length"
        chat.words = words
        return chat

    def _plan_responses(self, req: Any) -> _Response | _Answer:
        if not isinstance(req, dict):
            return _Answer(400, _error_body("The request body must be a JSON object.", "invalid_request_error", None))
        model, raw = req.get("model"), req.get("input")
        for name, value in (("model", model), ("input", raw)):
            if value is None:
                message = f"Missing required parameter: '{name}'."
                return _Answer(400, _error_body(message, "invalid_request_error", "missing_required_parameter", name))
        if not isinstance(model, str) or not model:
            message = f"Invalid type for 'model': expected a string, but got {_json_type(model)} instead."
            if isinstance(model, str):
                message = "Invalid 'model': empty string. Expected a string with minimum length 1."
            return _Answer(400, _error_body(message, "invalid_request_error", "invalid_type", "model"))
        if not isinstance(raw, (str, list)):
            message = (
                "Invalid type for 'input': expected one of a string or array of input items, "
                f"but got {_json_type(raw)} instead."
            )
            return _Answer(400, _error_body(message, "invalid_request_error", "invalid_type", "input"))
        if isinstance(raw, list):
            if not raw:
                message = (
                    "Invalid 'input': empty array. Expected an array with minimum length 1, "
                    "but got an empty array instead."
                )
                return _Answer(400, _error_body(message, "invalid_request_error", "empty_array", "input"))
            for index, item in enumerate(raw):
                if not isinstance(item, dict):
                    param = f"input[{index}]"
                    message = f"Invalid type for '{param}': expected an object, but got {_json_type(item)} instead."
                    return _Answer(400, _error_body(message, "invalid_request_error", "invalid_type", param))
        echo: dict[str, Any] = {}
        for name, default in _RESPONSE_ECHO_DEFAULTS.items():
            value = req.get(name)
            if value is None:
                value = default
            elif isinstance(default, dict) and isinstance(value, dict):
                value = {**default, **value}
            echo[name] = value
        plan = _Response(
            id=self._next_id("resp_"),
            created=int(time.time()),
            model=model,
            n=1,
            prompt_tokens=input_tokens_for(raw, req.get("instructions")),
            words=(),
            finish_reason="stop",
            stream=req.get("stream") is True,
            echo=echo,
        )
        tool = _pick_function(req)
        if tool is not None:
            plan.item_id, plan.call_id = self._next_id("fc_"), "call_" + _random_id(24)
            plan.tool_name = tool["name"]
            plan.tool_arguments = _arguments_for(tool)
            plan.finish_reason = "tool_calls"
            return plan
        plan.item_id = self._next_id("msg_")
        words = reply_words(self.reply)
        limit = _int_param(req, "max_output_tokens")
        if limit is not None and limit < len(words):
            words, plan.finish_reason = words[: max(0, limit)], "length"
        plan.words = words
        return plan

    def _embeddings(self, req: Any) -> _Answer:
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return _Answer(400, _error_body("you must provide a model parameter", "invalid_request_error", None))
        raw = req.get("input")
        if isinstance(raw, str):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            inputs = [raw]  # one input given as token ids
        elif isinstance(raw, list) and raw and all(isinstance(x, (str, list)) for x in raw):
            inputs = raw
        else:
            message = "'$.input' is invalid. Please check the API reference."
            return _Answer(400, _error_body(message, "invalid_request_error", None, "input"))
        dimensions = _int_param(req, "dimensions") or EMBEDDING_DIMENSIONS
        as_base64 = req.get("encoding_format") == "base64"
        data, prompt_tokens = [], 0
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                text, prompt_tokens = item, prompt_tokens + max(1, len(item) // 4)
            else:
                text, prompt_tokens = " ".join(map(str, item)), prompt_tokens + max(1, len(item))
            vector: Any = embedding_base64(text, dimensions) if as_base64 else embedding_for(text, dimensions)
            data.append({"object": "embedding", "index": index, "embedding": vector})
        body = {
            "object": "list",
            "data": data,
            "model": req["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return _Answer(200, orjson.dumps(body))

    def _decide(self, method: bytes, route: str, path: str, body: bytes) -> tuple[_Chat | _Answer, bool]:
        """(what to answer, whether it is a stream)."""
        if self.status is not None:
            return self._forced_error(), False
        payload: Any = None
        if method == b"POST":
            if body:
                try:
                    payload = orjson.loads(body)
                except orjson.JSONDecodeError:
                    return _Answer(400, _BAD_JSON_BODY), False
            if route == "/chat/completions":
                plan = self._plan_chat(payload)
                return plan, isinstance(plan, _Chat) and plan.stream
            if route == "/responses":
                plan = self._plan_responses(payload)
                return plan, isinstance(plan, _Chat) and plan.stream
            if route == "/embeddings":
                return self._embeddings(payload), False
        elif method == b"GET":
            if route == "/models":
                return _Answer(200, _MODELS_BODY), False
            if route.startswith("/models/"):
                wanted = route[len("/models/") :]
                for model, created, owned_by in MODELS:
                    if model == wanted:
                        found = {"id": model, "object": "model", "created": created, "owned_by": owned_by}
                        return _Answer(200, orjson.dumps(found)), False
                message = f"The model '{wanted}' does not exist"
                return _Answer(404, _error_body(message, "invalid_request_error", "model_not_found", "model")), False
        message = f"Invalid URL ({method.decode('latin-1')} {path})"
        return _Answer(404, _error_body(message, "invalid_request_error", None)), False

    def _head(
        self, status: int, content_type: bytes, started: float, length: int | None, close: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        """A response head. length None: a chunked body (close-delimited if `close`)."""
        parts = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nx-request-id: %s\r\nopenai-version: 2020-10-01\r\n"
            b"openai-processing-ms: %d\r\n"
            % (
                status,
                _REASONS.get(status, b""),
                content_type,
                self._next_id("req_").encode("ascii"),
                int((time.perf_counter() - started) * 1000),
            )
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

    def _simple(self, answer: _Answer, started: float, close: bool) -> bytes:
        return self._head(answer.status, _JSON, started, len(answer.body), close, answer.headers) + answer.body

    # -- I/O ------------------------------------------------------------------

    def _note_abort(self) -> None:
        self.streams_aborted += 1
        self.aborted.set()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # h11 parses requests; responses are written directly. One h11.Connection
        # per request, handed the bytes the previous one read past its request
        # (`trailing_data`): a fresh parser costs ~1 us, h11's response
        # serialisation (header validation, state machine) costs tens.
        self.connections_open += 1
        peer = _Peer(stream)
        try:
            while True:
                conn = h11.Connection(h11.SERVER)
                if peer.pending or peer.eof:
                    conn.receive_data(bytes(peer.pending))
                    peer.pending.clear()
                    if peer.eof:
                        conn.receive_data(b"")
                request = await _next_event(stream, conn)
                if type(request) is not h11.Request:
                    return  # ConnectionClosed: the client is done with this connection
                chunks = []
                while True:
                    event = await _next_event(stream, conn)
                    if type(event) is h11.Data:
                        chunks.append(bytes(event.data))
                    elif type(event) is h11.EndOfMessage:
                        break
                    else:  # pragma: no cover - h11 raises RemoteProtocolError first
                        return
                rest, peer.eof = conn.trailing_data
                peer.pending += rest
                close = request.http_version != b"1.1" or any(
                    name == b"connection" and b"close" in value.lower() for name, value in request.headers
                )
                keep_alive = await self._respond(peer, request, b"".join(chunks), close)
                if close or not keep_alive:
                    return
        except h11.RemoteProtocolError as exc:
            body = _error_body(f"Bad request: {exc}", "invalid_request_error", None)
            head = self._head(exc.error_status_hint, _JSON, time.perf_counter(), len(body), True)
            with trio.move_on_after(1):
                try:
                    await stream.send_all(head + body)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a bug in the mock: keep it visible to the tests, keep serving
            self.errors.append(exc)
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def _respond(self, peer: _Peer, request: h11.Request, body: bytes, close: bool) -> bool:
        """Answer one request; False if the connection must close afterwards."""
        started = time.perf_counter()
        stream = peer.stream
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        route = path[3:] if path.startswith("/v1/") else path
        if route == "/healthz":  # for the benchmark driver; not recorded, no knobs
            await stream.send_all(self._simple(_Answer(200, _HEALTHZ_BODY), started, close))
            return True
        self.counts[path] += 1
        if self.record:
            headers: dict[str, str] = {}
            for name, value in request.headers:
                key, text = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            try:
                decoded = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                decoded = None
            self.requests.append(Recorded(request.method.decode("latin-1"), path, headers, body, decoded))
        if self.hang:
            await _wait_for_eof(stream)
            self._note_abort()
            return False

        plan, streaming = self._decide(request.method, route, path, body)
        if streaming:
            assert isinstance(plan, _Chat)
            self.streams_started += 1
            delay_s, tokens_per_s = self.first_byte_delay_s, self.tokens_per_s
            sent = await _while_watching(
                peer, lambda: self._send_stream(stream, plan, started, delay_s, tokens_per_s, close)
            )
            if sent:
                self.streams_completed += 1
            else:
                self._note_abort()
            return sent

        answer = _Answer(200, plan.completion()) if isinstance(plan, _Chat) else plan
        delay_s = self.first_byte_delay_s + self.latency_s
        if delay_s > 0:

            async def delayed() -> None:
                await trio.sleep(delay_s)
                await stream.send_all(self._simple(answer, started, close))

            if not await _while_watching(peer, delayed):
                self._note_abort()
                return False
            return True
        await stream.send_all(self._simple(answer, started, close))
        return True

    async def _send_stream(
        self, stream: trio.SocketStream, chat: _Chat, started: float, delay_s: float, tokens_per_s: float,
        close: bool,
    ) -> None:
        if delay_s > 0:
            await trio.sleep(delay_s)
        events = chat.events()
        interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        # HTTP/1.1: chunked (RFC 9112 section 7.1); an HTTP/1.0 client gets a
        # close-delimited body.
        chunked = not close
        pending = self._head(200, _SSE, started, None, close)
        next_token_at = trio.current_time()
        last = len(events) - 1
        for i, (is_token, event) in enumerate(events):
            if is_token and interval_s:
                next_token_at += interval_s
                await trio.sleep_until(next_token_at)
            # The head goes with the first event, the last chunk with the last event
            # ([DONE] for chat); every event is its own write (trio sets TCP_NODELAY).
            data = pending + (b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
            pending = b""
            if i == last and chunked:
                data += b"0\r\n\r\n"
            await stream.send_all(data)


class _Peer:
    """One client connection: its stream and the bytes read past the current request."""

    __slots__ = ("stream", "pending", "eof")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending = bytearray()
        self.eof = False


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECV_BYTES))
            continue
        return event


async def _wait_for_eof(stream: trio.SocketStream) -> None:
    """Return when the client closes its side (anything it sends meanwhile is dropped)."""
    while True:
        try:
            if not await stream.receive_some(RECV_BYTES):
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _while_watching(peer: _Peer, send: Callable[[], Awaitable[None]]) -> bool:
    """Run `send` while watching the socket for EOF; False if the client went away first.

    A client that gives up mid-response closes its connection: we see EOF on the
    receive side even while sleeping (pacing, delays), and a failed send while
    writing. Only a `send` that did not finish counts as abandoned: a client may
    well close as soon as it has read the last byte (the openai SDK does, on
    `[DONE]` or at the end of a Responses stream), and that EOF can be seen in
    the same scheduler tick.
    """
    finished = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            try:
                data = await peer.stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:  # a pipelined next request: keep it for the next cycle, stop watching
                peer.pending += data
                return
            peer.eof = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            await send()
            finished = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()
    return finished


@asynccontextmanager
async def serve_mock_openai(host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> AsyncIterator[MockOpenAI]:
    """Serve a MockOpenAI on (host, port) in the current trio run; port 0 picks a free one."""
    mock = MockOpenAI(host=host, port=port, **knobs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, mock._serve_connection, port, host=host))
        mock.port = listeners[0].socket.getsockname()[1]
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()
