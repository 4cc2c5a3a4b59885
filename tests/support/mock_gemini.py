"""A mock Google Gemini API upstream that speaks Gemini's real wire format.

The connection handling (h11 reading, keep-alive, pipelining, watching the socket for
EOF while answering) is `MockOpenAI`'s, inherited; only the routes and the answers
differ. Like `mock_openai`, it is independent of `gwcore`: it is the reference the
Google adapter is tested against.

Routes (https://ai.google.dev/api/generate-content; `v1` and `v1beta`, as the
`google-genai` SDK uses `v1` unless told otherwise):

    POST /{v1|v1beta}/models/{model}:generateContent                 one GenerateContentResponse
    POST /{v1|v1beta}/models/{model}:streamGenerateContent?alt=sse   SSE, `data: {...}\\r\\n\\r\\n`
    POST /{v1|v1beta}/models/{model}:streamGenerateContent           a JSON array of them

The key is read from `x-goog-api-key` or the `key` query parameter. None: 403
PERMISSION_DENIED; one other than the `api_key` knob (when set): 400 INVALID_ARGUMENT
with reason API_KEY_INVALID, which is what Google answers to a bad key.

Per response:

    state            event                                next
    read request     knob hang                            watch the socket until EOF -> aborted, close
    read request     knob status                          Google error body for it, keep-alive
    read request     :streamGenerateContent?alt=sse       stream, watching the socket for EOF
    streaming        all chunks sent                      completed, keep-alive
    streaming        EOF seen / send failed               aborted, close
    read request     a delay is configured                wait (watching for EOF), then answer
    read request     otherwise                            answer at once, keep-alive

Answers are deterministic: the `reply` (cut `WORDS_PER_CHUNK` words per stream chunk),
or a function call when the request declares functions and either toolConfig asks for
one (mode ANY) or the last user turn contains "call a tool". Token counts: a prompt
token per 4 characters of text (at least 1), a candidate token per reply word, and
`thoughts_tokens` thinking tokens. Formats were checked against the `google-genai`
SDK's types (`google/genai/types.py`) and its SSE reader (`_api_client.py`).
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import parse_qs

import h11
import orjson
import trio

from tests.support.mock_openai import (
    MockOpenAI,
    Recorded,
    _Answer,
    _Peer,
    _random_id,
    _REASONS,
    _wait_for_eof,
    _while_watching,
    reply_words,
)

__all__ = [
    "DEFAULT_REPLY",
    "MockGemini",
    "Recorded",
    "arguments_for",
    "google_error_body",
    "prompt_tokens_for",
    "serve_mock_gemini",
]

DEFAULT_REPLY = "Hello! This is a mock reply from the Gemini upstream."
# Words per streamed chunk: Gemini streams a few words to a sentence per event.
WORDS_PER_CHUNK = 3
_ROUTE = re.compile(r"/(v1|v1beta)/(models|tunedModels)/([^/:]+):(generateContent|streamGenerateContent)")

_KNOB_DEFAULTS: dict[str, Any] = {
    "status": None,
    "error_body": None,
    "retry_after": None,  # seconds, sent as a RetryInfo retryDelay on a forced 429
    "hang": False,
    "first_byte_delay_s": 0.0,
    "latency_s": 0.0,
    "tokens_per_s": 0.0,
    "reply": DEFAULT_REPLY,
    "record": True,
    "api_key": None,  # None: any non-empty key is accepted
    "thoughts_tokens": 0,
}

# status -> (google.rpc status, message), after what generativelanguage.googleapis.com sends.
_FORCED_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
                      "https://developers.generativeai.google/guide/troubleshooting"),
    502: ("UNAVAILABLE", "Bad gateway."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}
_JSON = b"application/json; charset=UTF-8"
_SSE = b"text/event-stream"


def google_error_body(code: int, status: str, message: str, details: list[Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return orjson.dumps({"error": error})


def _texts(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def prompt_tokens_for(request: dict[str, Any]) -> int:
    """A prompt token per 4 characters of text in contents and systemInstruction (at least 1)."""
    chars = sum(len(_texts(c.get("parts"))) for c in request.get("contents") or [] if isinstance(c, dict))
    system = request.get("systemInstruction")
    if isinstance(system, dict):
        chars += len(_texts(system.get("parts")))
    return max(1, chars // 4)


def _placeholder(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = str(schema.get("type", "")).lower()
    return {"string": "mock", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(kind)


def arguments_for(declaration: dict[str, Any]) -> dict[str, Any]:
    """Arguments for a call: a placeholder for each required parameter."""
    schema = declaration.get("parameters") or declaration.get("parametersJsonSchema")
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return {name: _placeholder(properties.get(name)) for name in required if isinstance(name, str)}


def _pick_function(req: dict[str, Any]) -> dict[str, Any] | None:
    declarations = [
        d
        for tool in req.get("tools") or []
        if isinstance(tool, dict)
        for d in tool.get("functionDeclarations") or []
        if isinstance(d, dict)
    ]
    if not declarations:
        return None
    config = (req.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = config.get("mode", "AUTO")
    if mode == "NONE":
        return None
    allowed = config.get("allowedFunctionNames") or []
    if mode == "ANY":
        return next((d for d in declarations if d.get("name") in allowed), declarations[0])
    users = [c for c in req.get("contents") or [] if isinstance(c, dict) and c.get("role") == "user"]
    if users and "call a tool" in _texts(users[-1].get("parts")).lower():
        return declarations[0]
    return None


@dataclass(slots=True)
class _Generation:
    """What to answer to one generateContent request (the same for every candidate)."""

    response_id: str
    model_version: str
    n: int
    prompt_tokens: int
    words: tuple[str, ...]
    finish_reason: str  # STOP or MAX_TOKENS
    thoughts_tokens: int = 0
    call: dict[str, Any] | None = None  # {"name", "args"}

    @property
    def candidate_tokens(self) -> int:
        per = len(self.words) if self.call is None else max(1, len(orjson.dumps(self.call["args"])) // 4)
        return per * self.n

    def usage(self, final: bool = True) -> dict[str, Any]:
        p = self.prompt_tokens
        usage: dict[str, Any] = {"promptTokenCount": p, "totalTokenCount": p}
        if final:
            usage["candidatesTokenCount"] = self.candidate_tokens
            usage["totalTokenCount"] = p + self.candidate_tokens + self.thoughts_tokens
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": p}]
        if final and self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return usage

    def _response(self, candidates: list[dict[str, Any]], final: bool) -> dict[str, Any]:
        return {
            "candidates": candidates,
            "usageMetadata": self.usage(final),
            "modelVersion": self.model_version,
            "responseId": self.response_id,
        }

    def _candidate(self, index: int, parts: list[dict[str, Any]], finish: bool, stream: bool) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finish:
            cand["finishReason"] = self.finish_reason
        # proto3 JSON leaves out a zero index; streamed chunks do so, whole answers carry it.
        if index or not stream:
            cand["index"] = index
        return cand

    def whole(self) -> dict[str, Any]:
        parts = [{"functionCall": self.call}] if self.call else [{"text": "".join(self.words)}]
        return self._response([self._candidate(i, parts, True, False) for i in range(self.n)], True)

    def chunks(self) -> list[tuple[int, dict[str, Any]]]:
        """The stream's responses, each with the number of tokens it carries (for pacing)."""
        if self.call:
            parts = [{"functionCall": self.call}]
            return [(1, self._response([self._candidate(i, parts, True, True) for i in range(self.n)], True))]
        groups = [self.words[i : i + WORDS_PER_CHUNK] for i in range(0, len(self.words), WORDS_PER_CHUNK)] or [()]
        out = []
        for k, group in enumerate(groups):
            last = k == len(groups) - 1
            parts = [{"text": "".join(group)}]
            out.append((len(group), self._response([self._candidate(i, parts, last, True) for i in range(self.n)], last)))
        return out


class MockGemini(MockOpenAI):
    """The state of one mock Gemini upstream: knobs that tests set, and what it observed.

    Knobs (plain attributes, read at the start of each request): status, error_body,
      retry_after, hang, first_byte_delay_s, latency_s, tokens_per_s, reply, record,
      api_key, thoughts_tokens.
    Observations: requests (paths without the query), queries (the query strings, in
      the same order), counts, streams_started, streams_completed, streams_aborted,
      aborted, connections_open, errors.
    """

    api_key: str | None
    thoughts_tokens: int

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.host = host
        self.port = port
        self.connections_open = 0
        self.reset()
        for name, value in knobs.items():
            if name not in _KNOB_DEFAULTS:
                raise TypeError(f"unknown MockGemini knob {name!r}; knobs are {sorted(_KNOB_DEFAULTS)}")
            setattr(self, name, value)
        self._ids = itertools.count()
        self._id_prefix = _random_id(8)

    def reset(self) -> None:
        """Knobs back to their defaults, observations cleared (open connections stay counted)."""
        super().reset()  # the observations, and MockOpenAI's knobs
        for name, value in _KNOB_DEFAULTS.items():
            setattr(self, name, value)
        self.queries: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- deciding (sync) ------------------------------------------------------

    def _forced_error(self) -> _Answer:
        assert self.status is not None
        if self.error_body is not None:
            return _Answer(self.status, self.error_body)
        status, message = _FORCED_ERRORS.get(self.status, ("UNKNOWN", "Forced error."))
        details = None
        if self.status == 429 and self.retry_after is not None:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{self.retry_after}s"}]
        return _Answer(self.status, google_error_body(self.status, status, message, details))

    def _check_key(self, headers: list[tuple[bytes, bytes]], query: dict[str, list[str]]) -> _Answer | None:
        key = next((v.decode("latin-1") for k, v in headers if k == b"x-goog-api-key"), None)
        key = key or (query.get("key") or [None])[0]
        if not key:
            message = (
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."
            )
            return _Answer(403, google_error_body(403, "PERMISSION_DENIED", message))
        if self.api_key is not None and key != self.api_key:
            details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]
            return _Answer(400, google_error_body(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid "
                                                  "API key.", details))
        return None

    def _plan(self, model: str, req: Any) -> _Generation | _Answer:
        if not isinstance(req, dict):
            return _Answer(400, google_error_body(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
        contents = req.get("contents")
        if not isinstance(contents, list) or not contents:
            message = "* GenerateContentRequest.contents: contents is not specified\n"
            return _Answer(400, google_error_body(400, "INVALID_ARGUMENT", message))
        config = req.get("generationConfig") or {}
        n = config.get("candidateCount") if isinstance(config.get("candidateCount"), int) else 1
        plan = _Generation(
            response_id=f"{self._id_prefix}{next(self._ids):06d}",
            model_version=model,
            n=max(1, n),
            prompt_tokens=prompt_tokens_for(req),
            words=(),
            finish_reason="STOP",
            thoughts_tokens=self.thoughts_tokens,
        )
        function = _pick_function(req)
        if function is not None:
            plan.call = {"name": function.get("name", ""), "args": arguments_for(function)}
            return plan
        words = reply_words(self.reply)
        limit = config.get("maxOutputTokens")
        if isinstance(limit, int) and limit < len(words):
            words, plan.finish_reason = words[: max(0, limit)], "MAX_TOKENS"
        plan.words = words
        return plan

    def _decide_gemini(self, request: h11.Request, body: bytes) -> tuple[_Generation | _Answer, str]:
        """(what to answer, how: "json", "sse" or "array")."""
        target = request.target.decode("latin-1")
        path, _, raw_query = target.partition("?")
        query = parse_qs(raw_query)
        if self.status is not None:
            return self._forced_error(), "json"
        m = _ROUTE.fullmatch(path)
        if request.method != b"POST" or m is None:
            message = f"The requested URL {path} was not found on this server."
            return _Answer(404, google_error_body(404, "NOT_FOUND", message)), "json"
        denied = self._check_key(request.headers, query)
        if denied is not None:
            return denied, "json"
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return _Answer(400, google_error_body(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")), "json"
        plan = self._plan(m[3], payload)
        if isinstance(plan, _Answer) or m[4] == "generateContent":
            return plan, "json"
        return plan, "sse" if query.get("alt") == ["sse"] else "array"

    def _head(
        self, status: int, content_type: bytes, started: float, length: int | None, close: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        parts = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nvary: Origin, X-Origin, Referer\r\n"
            b"server: scaffolding on HTTPServer2\r\nserver-timing: gfet4t7; dur=%d\r\n"
            % (status, _REASONS.get(status, b""), content_type, int((time.perf_counter() - started) * 1000))
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

    # -- I/O ------------------------------------------------------------------

    async def _respond(self, peer: _Peer, request: h11.Request, body: bytes, close: bool) -> bool:
        started = time.perf_counter()
        stream = peer.stream
        path, _, query = request.target.decode("latin-1").partition("?")
        if path == "/healthz":  # for the benchmark driver, as in mock_openai
            return await super()._respond(peer, request, body, close)
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
            self.queries.append(query)
        if self.hang:
            await _wait_for_eof(stream)
            self._note_abort()
            return False

        plan, how = self._decide_gemini(request, body)
        if how == "sse":
            assert isinstance(plan, _Generation)
            self.streams_started += 1
            delay_s, tokens_per_s = self.first_byte_delay_s, self.tokens_per_s
            sent = await _while_watching(
                peer, lambda: self._send_sse(stream, plan, started, delay_s, tokens_per_s, close)
            )
            if sent:
                self.streams_completed += 1
            else:
                self._note_abort()
            return sent

        if isinstance(plan, _Generation):
            whole = orjson.dumps(plan.whole() if how == "json" else [r for _, r in plan.chunks()])
            answer = _Answer(200, whole)
        else:
            answer = plan
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

    def _simple(self, answer: _Answer, started: float, close: bool) -> bytes:
        return self._head(answer.status, _JSON, started, len(answer.body), close, answer.headers) + answer.body

    async def _send_sse(
        self, stream: trio.SocketStream, plan: _Generation, started: float, delay_s: float, tokens_per_s: float,
        close: bool,
    ) -> None:
        if delay_s > 0:
            await trio.sleep(delay_s)
        chunked = not close
        pending = self._head(200, _SSE, started, None, close)
        next_at = trio.current_time()
        chunks = plan.chunks()
        for i, (tokens, response) in enumerate(chunks):
            if tokens_per_s > 0:
                next_at += tokens / tokens_per_s
                await trio.sleep_until(next_at)
            # Google ends SSE lines with CRLF.
            event = b"data: " + orjson.dumps(response) + b"\r\n\r\n"
            data = pending + (b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
            pending = b""
            if i == len(chunks) - 1 and chunked:
                data += b"0\r\n\r\n"
            await stream.send_all(data)


@asynccontextmanager
async def serve_mock_gemini(host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> AsyncIterator[MockGemini]:
    """Serve a MockGemini on (host, port) in the current trio run; port 0 picks a free one."""
    mock = MockGemini(host=host, port=port, **knobs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, mock._serve_connection, port, host=host))
        mock.port = listeners[0].socket.getsockname()[1]
        try:
            yield mock
        finally:
            nursery.cancel_scope.cancel()
