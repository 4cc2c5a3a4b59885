"""Anthropic Messages API: the upstream adapter, and the ``/v1/messages`` ingress.

Upstream direction (hub → Anthropic → hub): ``build_chat`` turns an OpenAI chat request
into ``POST /v1/messages``; ``parse_chat``, ``StreamTranslator`` and ``map_error`` turn
Anthropic's answers back into OpenAI chat format.  Ingress direction (Anthropic client
→ hub → Anthropic client): ``ingress_to_openai``, ``openai_to_ingress`` and
``IngressStreamTranslator``.  Everything here is a pure function of its input: ids are
derived from the upstream's ids and ``created`` is passed in.

Formats: https://docs.anthropic.com/en/api/messages and .../messages-streaming, with
``anthropic-version: 2023-06-01``, checked against the ``anthropic`` SDK's types
(``types/message.py``, ``raw_message_stream_event.py``, ``message_create_params.py``,
``usage.py``).  The SDK 2.x itself sends ``anthropic-version: 2026-10-21``, a version
without ``temperature``/``top_p``/``top_k``; the gateway pins 2023-06-01, where they
are still accepted, so they are passed through.

What cannot be translated faithfully is refused with a 400 naming the field
(``InvalidRequest``, code ``unsupported_parameter``): never a silently different request.
Hints that do not change the answer (caching, storage, service tier) are dropped.

Not carried across: thinking blocks (Anthropic's private reasoning has no place in an
OpenAI message; its tokens still count in ``reasoning_tokens``), citations, and server
tool blocks (the gateway never asks for server tools).
"""
from __future__ import annotations

import math
from typing import Any

import orjson

from gwcore.config import Deployment
from gwcore.errors import (GatewayError, InvalidRequest, UpstreamError, UpstreamStatus,
                           UpstreamUnavailable)
from gwcore.providers.base import (SSEEventLike, UpstreamRequest, count, reads_upstream,
                                   request_json)
from gwcore.providers.openai import join_url
from gwcore.wire import Usage
from gwnative import encode_event

__all__ = [
    "API_VERSION", "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "IngressStreamTranslator",
    "StreamTranslator", "build_chat", "ingress_to_openai", "map_error", "openai_to_ingress",
    "parse_chat",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
# The version the request and response formats below follow (the API's first stable one,
# still the one most clients pin).
API_VERSION = "2023-06-01"
# Anthropic requires max_tokens, OpenAI does not: 4096 is the largest output every
# current Claude model accepts (the Claude 3 models' maximum).
DEFAULT_MAX_TOKENS = 4096

_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

# Anthropic stop_reason -> OpenAI finish_reason.  pause_turn (a server tool paused a
# long turn) ends this answer like a natural stop.
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
           "max_tokens": "length", "model_context_window_exceeded": "length",
           "tool_use": "tool_calls", "refusal": "content_filter"}
# and back, for the ingress.
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "function_call": "tool_use", "content_filter": "refusal"}

# Anthropic error.type -> the HTTP status it comes with (API errors page), so that an
# error event inside a stream is mapped like the same error as a response.
_STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401,
                   "billing_error": 402, "permission_error": 403, "not_found_error": 404,
                   "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                   "timeout_error": 504, "overloaded_error": 529}


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' is not supported for Anthropic models: {why}",
                          code="unsupported_parameter", param=param)


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_value", param=param)


# ---------------------------------------------------------------------------------------
# OpenAI chat request -> Anthropic Messages request
# ---------------------------------------------------------------------------------------

# OpenAI fields that are harmless to drop: they do not change the answer.
_DROPPED = frozenset({"model", "stream_options", "store", "metadata", "service_tier",
                      "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                      "safety_identifier"})
# OpenAI fields that change the answer and have no Anthropic equivalent, with the
# values that mean "not used" (and so are accepted).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "logit_bias": ({},), "modalities": (["text"],),
    "seed": (), "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (),
    "web_search_options": (), "functions": (), "function_call": (), "moderation": (),
}
_TRANSLATED = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature",
                         "top_p", "stop", "stream", "user", "tools", "tool_choice",
                         "parallel_tool_calls", "response_format"})


def _headers(api_key: str | None) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json"), ("accept", "application/json"),
               ("anthropic-version", API_VERSION)]
    if api_key:
        headers.append(("x-api-key", api_key))
    return headers


def build_chat(body: dict[str, Any], dep: Deployment, base_url: str | None,
               api_key: str | None) -> UpstreamRequest:
    """An OpenAI chat request as ``POST {base_url}/v1/messages``.

    Raises ``InvalidRequest`` (400) naming the field for anything that cannot be sent
    faithfully; see the module docstring and ``_NEUTRAL``.
    """
    for name, value in body.items():
        if value is None or name in _DROPPED or name in _TRANSLATED:
            continue
        if name in _NEUTRAL:
            if any(value == n and isinstance(value, bool) == isinstance(n, bool)
                   for n in _NEUTRAL[name]):
                continue
            raise _unsupported(name, "Anthropic has no equivalent")
        raise _unsupported(name, "unknown field")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _unsupported("response_format", "JSON output modes are not translated")

    out: dict[str, Any] = {"model": dep.model, "max_tokens": _max_tokens(body)}
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages",
                             code="invalid_value")
    system, turns = _turns(messages)
    if system is not None:
        out["system"] = system
    out["messages"] = turns
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("tools", "'tools' must be an array.")
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
            choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
            if choice is not None:
                out["tool_choice"] = choice
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = stop
    elif stop is not None:
        raise _invalid("stop", "'stop' must be a string or an array of strings.")
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature):
            raise _invalid("temperature", "'temperature' must be a number.")
        if temperature > 1:
            raise _unsupported("temperature", "Anthropic's range is 0 to 1 and values above 1 "
                                              "have no equivalent")
        out["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p):
            raise _invalid("top_p", "'top_p' must be a number.")
        out["top_p"] = top_p
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
    return UpstreamRequest("POST", join_url(base_url or DEFAULT_BASE_URL, "/v1/messages"),
                           _headers(api_key), request_json(out), stream=stream)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _invalid(name, f"'{name}' must be a non-negative integer.")
        return value
    return DEFAULT_MAX_TOKENS


def _turns(messages: list[Any]) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(system, alternating user/assistant turns) from OpenAI messages.

    System and developer messages are hoisted, in order, into ``system``.  Consecutive
    messages of one role (a tool result is a user turn) become one turn, as Anthropic
    requires alternation.  A turn is a plain string when it is one text message.
    """
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, f"'{where}' must be an object.")
        role = message.get("role")
        if role in ("system", "developer"):
            system += [{"type": "text", "text": t} for t in _texts(message.get("content"), where)]
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
            role = "assistant"
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _invalid(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required.")
            content = message.get("content")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
            if isinstance(content, str):
                result["content"] = content
            else:
                result["content"] = [{"type": "text", "text": t} for t in _texts(content, where)]
            blocks, role = [result], "user"
        else:
            raise _unsupported(f"{where}.role", f"role {role!r} cannot be translated")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        raise InvalidRequest("Anthropic models need the conversation to start with a user "
                             "message (after any system messages).", param="messages",
                             code="invalid_value")
    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text" and "_plain" in content[0]:
            turn["content"] = content[0]["text"]
        else:
            for block in content:
                block.pop("_plain", None)
    if not system:
        return None, turns
    if len(system) == 1:
        return system[0]["text"], turns
    return system, turns


def _texts(content: Any, where: str) -> list[str]:
    """The texts of a system, developer or tool message (a string or text parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise _unsupported(f"{where}.content[{j}]", "only text parts are allowed here")
            out.append(part["text"])
        return out
    raise _invalid(f"{where}.content", f"'{where}.content' must be a string or an array.")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        # "_plain" marks a string message, kept a string if it stays alone in its turn.
        return [{"type": "text", "text": content, "_plain": True}]
    if not isinstance(content, list):
        raise _invalid(f"{where}.content", f"'{where}.content' must be a string or an array.")
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), at))
        else:
            raise _unsupported(at, f"content part type {kind!r} cannot be translated")
    return blocks


def _image(image: Any, at: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _invalid(f"{at}.image_url", f"'{at}.image_url.url' is required.")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64":
            raise _invalid(f"{at}.image_url", "An image data URL must be base64-encoded.")
        if media_type not in _IMAGE_TYPES:
            raise _unsupported(f"{at}.image_url", f"image type {media_type!r}; Anthropic "
                                                  f"accepts {', '.join(_IMAGE_TYPES)}")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _invalid(f"{at}.image_url", "An image URL must be http(s) or a base64 data URL.")


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content, "_plain": True})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get("text") if kind == "text" else \
                part.get("refusal") if kind == "refusal" else None
            if not isinstance(text, str):
                raise _unsupported(f"{where}.content[{j}]", "only text parts are allowed here")
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise _invalid(f"{where}.content", f"'{where}.content' must be a string or an array.")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _invalid(f"{where}.tool_calls", f"'{where}.tool_calls' must be an array.")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function" or \
                not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
            raise _invalid(at, f"'{at}' must be a function call with an id and a name.")
        arguments = fn.get("arguments")
        # An empty string is what some clients send for a call without arguments.
        try:
            parsed = orjson.loads(arguments) if arguments else {}
        except (orjson.JSONDecodeError, TypeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise _invalid(f"{at}.function.arguments",
                           f"'{at}.function.arguments' must be a JSON object.")
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                       "input": parsed})
    if not blocks:
        raise _invalid(f"{where}.content",
                       f"'{where}' needs content or tool_calls: Anthropic rejects empty turns.")
    return blocks


def _tool(tool: Any, i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise _unsupported(f"tools[{i}]", "only function tools can be translated")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    # ``strict`` is dropped: the schema is sent, the guarantee to follow it is not.
    params = fn.get("parameters")
    out["input_schema"] = params if isinstance(params, dict) else {"type": "object",
                                                                    "properties": {}}
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}  # Anthropic's "none" has no disable_parallel_tool_use
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict) and \
            isinstance(choice["function"].get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _unsupported("tool_choice", "only auto, none, required and a named function "
                                          "can be translated")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # Anthropic's default is auto, as OpenAI's
    return out


# ---------------------------------------------------------------------------------------
# Anthropic answers -> OpenAI chat answers
# ---------------------------------------------------------------------------------------

def _usage_from(u: dict[str, Any]) -> Usage:
    """Anthropic usage (input_tokens excludes the cached parts) as the normalised Usage.

    Counts that are not non-negative ints count 0 (``count``): usage feeds accounting.
    """
    cache_read = count(u.get("cache_read_input_tokens"))
    cache_write = count(u.get("cache_creation_input_tokens"))
    details = u.get("output_tokens_details")
    return Usage(prompt_tokens=count(u.get("input_tokens")) + cache_read + cache_write,
                 completion_tokens=count(u.get("output_tokens")),
                 cached_tokens=cache_read,
                 reasoning_tokens=count(details.get("thinking_tokens"))
                 if isinstance(details, dict) else 0,
                 cache_write_tokens=cache_write)


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def _hub_call(block: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic tool_use block as an OpenAI tool call (arguments: compact JSON)."""
    return {"id": block.get("id"), "type": "function",
            "function": {"name": block.get("name"),
                         "arguments": orjson.dumps(block.get("input") or {}).decode()}}


def _chat_id(message_id: Any) -> str:
    return f"chatcmpl-{message_id}" if isinstance(message_id, str) else "chatcmpl-"


def _json_object(body: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"The upstream sent {what} that is not JSON.") from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"The upstream sent {what} that is not a JSON object.")
    return data


@reads_upstream("a message")
def parse_chat(body: bytes, model: str, created: int) -> tuple[bytes, Usage | None]:
    """An Anthropic Message as an OpenAI ``chat.completion`` (bytes) and its Usage."""
    msg = _json_object(body, "a message")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append(_hub_call(block))
    message: dict[str, Any] = {"role": "assistant",
                               "content": None if calls and not texts else "".join(texts),
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    usage = _usage_from(msg["usage"]) if isinstance(msg.get("usage"), dict) else None
    out: dict[str, Any] = {
        "id": _chat_id(msg.get("id")), "object": "chat.completion", "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _FINISH.get(msg.get("stop_reason"), "stop")}],
    }
    if usage is not None:
        out["usage"] = _openai_usage(usage)
    return orjson.dumps(out), usage


class StreamTranslator:
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` frames out.

    How this works: Anthropic streams numbered content blocks (text, tool_use, thinking),
    each opened, filled by deltas and closed, inside message_start ... message_stop.
    OpenAI streams one choice whose delta carries content or ``tool_calls[index]``, where
    the index counts tool calls, not blocks.  The translator keeps the Anthropic block
    index of each tool call, and the usage as it grows (input at message_start, output
    and cumulative totals at message_delta).

        event                        frames out
        ---------------------------  ------------------------------------------------
        message_start                the role chunk: {"role":"assistant","content":""}
        content_block_start text     a content chunk if the block starts with text
        content_block_start tool_use tool_calls[{index, id, type, function{name, ""}}]
        content_block_delta text     a content chunk
        content_block_delta json     tool_calls[{index, function{arguments}}]
        content_block_stop tool_use  "{}" as arguments if none were streamed
        thinking/signature/citations nothing (see the module docstring)
        message_delta                nothing: stop_reason and usage are kept
        message_stop                 finish chunk, usage chunk (include_usage), [DONE]
        ping, unknown events         nothing
        error                        raises the mapped GatewayError

    The finish chunk waits for message_stop, so a stream cut before it ends without a
    finish_reason and ``done`` stays False: the caller reports it as an error.
    """

    def __init__(self, model: str, include_usage: bool, created: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = created
        self.usage: Usage | None = None
        self.done = False
        self.finish_reason: str | None = None
        self._raw_usage: dict[str, Any] = {}
        self._id = "chatcmpl-"
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._tool_input: dict[int, Any] = {}  # block index -> start input, until arguments come
        self._started = False

    @reads_upstream("a stream event")
    def feed(self, event: SSEEventLike) -> list[bytes]:
        if not event.data:
            return []
        data = _json_object(event.data, "a stream event")
        kind = data.get("type") or event.event
        if kind == "error":
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            raise _error_for(_STATUS_BY_TYPE.get(error.get("type"), 500),
                             error.get("message") or "error event", error.get("type"), [])
        if self.done:
            return []
        if kind == "message_start":
            message = data.get("message") or {}
            self._id = _chat_id(message.get("id"))
            self._started = True
            self._add_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if not self._started:
            return []
        if kind == "content_block_start":
            return self._block_start(data.get("index"), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index"), data.get("delta") or {})
        if kind == "content_block_stop":
            index = data.get("index")
            if index in self._tool_input:  # a tool call whose arguments never came
                arguments = orjson.dumps(self._tool_input.pop(index) or {}).decode()
                return [self._tool_chunk(index, {"function": {"arguments": arguments}})]
            return []
        if kind == "message_delta":
            delta = data.get("delta") or {}
            self.finish_reason = _FINISH.get(delta.get("stop_reason"), "stop")
            self._add_usage(data.get("usage"))
            return []
        if kind == "message_stop":
            self.done = True
            out = [self._chunk({}, self.finish_reason or "stop")]
            if self.include_usage:
                usage = _openai_usage(self.usage or Usage())
                out.append(self._frame({"id": self._id, "object": "chat.completion.chunk",
                                        "created": self.created, "model": self.model,
                                        "choices": [], "usage": usage}))
            out.append(encode_event("[DONE]"))
            return out
        return []  # ping, and event types added after this was written

    def _block_start(self, index: Any, block: dict[str, Any]) -> list[bytes]:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind == "tool_use":
            self._tools[index] = len(self._tools)
            self._tool_input[index] = block.get("input")
            call = {"id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            return [self._tool_chunk(index, call)]
        return []

    def _block_delta(self, index: Any, delta: dict[str, Any]) -> list[bytes]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            self._tool_input.pop(index, None)
            return [self._tool_chunk(index, {"function": {"arguments": delta["partial_json"]}})]
        return []

    def _add_usage(self, usage: Any) -> None:
        # message_delta's counts are cumulative totals: they replace, never add.
        if isinstance(usage, dict):
            self._raw_usage.update({k: v for k, v in usage.items() if v is not None})
            self.usage = _usage_from(self._raw_usage)

    def _tool_chunk(self, index: Any, call: dict[str, Any]) -> bytes:
        return self._chunk({"tool_calls": [{"index": self._tools[index], **call}]})

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return self._frame(chunk)

    @staticmethod
    def _frame(chunk: dict[str, Any]) -> bytes:
        return encode_event(orjson.dumps(chunk))


def _anthropic_error(body: bytes) -> tuple[str | None, str | None]:
    """(error.type, error.message) of an Anthropic error body, or Nones."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None
    kind, message = error.get("type"), error.get("message")
    return (kind if isinstance(kind, str) else None,
            message if isinstance(message, str) else None)


def map_error(status: int, body: bytes, headers: list[tuple[str, str]]) -> GatewayError:
    """An Anthropic error response as the error the client should see.

    The policy of ``gwcore.providers.openai.map_error``: the client's own mistakes keep
    their status and Anthropic's message, 429 stays 429 with retry-after, 401/403 are the
    gateway's provider key (502).  529 (Anthropic is overloaded) becomes a 503
    ``upstream_unavailable``; other 5xx a 502.
    """
    kind, message = _anthropic_error(body)
    message = message or body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    retry = [(k, v) for k, v in headers if k.lower() == "retry-after"]
    return _error_for(status, message, kind, retry)


def _error_for(status: int, message: str, kind: str | None,
               retry: list[tuple[str, str]]) -> GatewayError:
    if status in (400, 404, 409, 413, 415, 422):
        code = {404: "not_found", 413: "request_too_large"}.get(status, "invalid_request")
        return UpstreamStatus(status, message, type_="invalid_request_error", code=code)
    if status == 429:
        return UpstreamStatus(429, message, type_="rate_limit_error",
                              code="rate_limit_exceeded", headers=retry)
    if status in (401, 402, 403):
        return UpstreamError(f"The upstream rejected the gateway's provider credentials "
                             f"(HTTP {status}{', ' + kind if kind else ''}).")
    if status == 529 or kind == "overloaded_error":
        return UpstreamUnavailable(f"The upstream is overloaded: {message}", headers=retry)
    return UpstreamError(f"The upstream returned HTTP {status}: {message}")


# ---------------------------------------------------------------------------------------
# Ingress: Anthropic Messages request -> OpenAI chat request, and answers back
# ---------------------------------------------------------------------------------------

# Anthropic fields that do not change the answer: dropped.
_INGRESS_DROPPED = frozenset({"cache_control", "service_tier", "speed", "diagnostics",
                              "user_profile_id", "workspace_id"})
_INGRESS_TRANSLATED = frozenset({"model", "max_tokens", "messages", "system", "tools",
                                 "tool_choice", "stop_sequences", "temperature", "top_p",
                                 "stream", "metadata", "thinking"})


def _required(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_value", param=param)


def ingress_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as the OpenAI chat request it stands for.

    Errors read like Anthropic's own (``field: problem``).  A streamed request asks for
    ``stream_options.include_usage``, which ``IngressStreamTranslator`` relies on.
    """
    if not isinstance(body, dict):
        raise _required("The request body must be a JSON object.", "body")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise _required(f"{name}: Field required", name)
    for name, value in body.items():
        if value is None or name in _INGRESS_DROPPED or name in _INGRESS_TRANSLATED:
            continue
        if name == "top_k":
            raise _unsupported("top_k", "OpenAI chat has no top_k")
        raise _unsupported(name, "it has no OpenAI chat equivalent")
    model, max_tokens, messages = body["model"], body["max_tokens"], body["messages"]
    if not isinstance(model, str) or not model:
        raise _required("model: Input should be a valid string", "model")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _required("max_tokens: Input should be a valid non-negative integer", "max_tokens")
    if not isinstance(messages, list):
        raise _required("messages: Input should be a valid list", "messages")
    thinking = body.get("thinking")
    if thinking is not None and \
            not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise _unsupported("thinking", "extended thinking cannot be translated to OpenAI chat")

    out: dict[str, Any] = {"model": model, "messages": []}
    system = body.get("system")
    if system is not None:
        out["messages"].append({"role": "system", "content": _ingress_system(system, "system")})
    for i, message in enumerate(messages):
        out["messages"] += _ingress_message(message, f"messages.{i}")
    out["max_completion_tokens"] = max_tokens
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _required("stop_sequences: Input should be a valid list of strings",
                            "stop_sequences")
        if stop:
            out["stop"] = stop
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _required(f"{name}: Input should be a valid number", name)
            out[name] = value
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _required("tools: Input should be a valid list", "tools")
        if tools:
            out["tools"] = [_ingress_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        _ingress_tool_choice(choice, out)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _ingress_system(system: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        parts = []
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text" or \
                    not isinstance(block.get("text"), str):
                raise _unsupported(f"{where}.{j}", "only text blocks are allowed here")
            parts.append({"type": "text", "text": block["text"]})  # cache_control dropped
        return parts
    raise _required(f"{where}: Input should be a valid string or list", where)


def _ingress_message(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _required(f"{where}: Input should be a valid dictionary", where)
    role, content = message.get("role"), message.get("content")
    if role == "system":  # the SDK 2.x's SystemMessageParam
        return [{"role": "system", "content": _ingress_system(content, f"{where}.content")}]
    if role not in ("user", "assistant"):
        raise _required(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _required(f"{where}.content: Input should be a valid string or list",
                        f"{where}.content")
    if role == "assistant":
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                calls.append(_hub_call(block))
            elif kind in ("thinking", "redacted_thinking"):
                continue  # earlier private reasoning: an OpenAI model cannot take it back
            else:
                raise _unsupported(f"{where}.content.{j}.type", f"block type {kind!r}")
        out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _ingress_image(block, at)}})
        elif kind == "tool_result":
            # is_error has no OpenAI equivalent and is dropped; the content says what failed.
            result = block.get("content")
            if result is None:
                result = ""
            elif not isinstance(result, str):
                result = [{"type": "text", "text": t} for t in _result_texts(result, at)]
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": result})
        else:
            raise _unsupported(f"{at}.type", f"block type {kind!r}")
    # OpenAI wants tool messages right after the assistant's tool_calls; Anthropic puts
    # tool_result blocks first in the user turn, so the order is kept.
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _result_texts(content: Any, at: str) -> list[str]:
    if not isinstance(content, list):
        raise _required(f"{at}.content: Input should be a valid string or list", f"{at}.content")
    texts = []
    for k, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _unsupported(f"{at}.content.{k}.type", "OpenAI tool results are text only")
        texts.append(block.get("text") or "")
    return texts


def _ingress_image(block: dict[str, Any], at: str) -> str:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type')};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise _unsupported(f"{at}.source", f"image source type {kind!r}")


def _ingress_tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or \
            not isinstance(tool.get("name"), str):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _unsupported(f"tools.{i}", f"tool type {kind!r}: only client tools translate")
    fn: dict[str, Any] = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict") is True:
        fn["strict"] = True
    return {"type": "function", "function": fn}


def _ingress_tool_choice(choice: Any, out: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _required("tool_choice: Input should be auto, any, tool or none", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and "tools" in out:
        out["parallel_tool_calls"] = False


def _message_id(completion_id: Any) -> str:
    """``msg_...`` from a chat completion id; an Anthropic answer gets its own id back."""
    raw = completion_id if isinstance(completion_id, str) else ""
    raw = raw.removeprefix("chatcmpl-")
    return raw if raw.startswith("msg_") else f"msg_{raw}"


def _ingress_usage(usage: Any) -> dict[str, int]:
    u = usage if isinstance(usage, dict) else {}
    details = u.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {"input_tokens": max(0, count(u.get("prompt_tokens")) - cached),
            "output_tokens": count(u.get("completion_tokens")),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_input(arguments: Any) -> dict[str, Any]:
    try:
        parsed = orjson.loads(arguments) if arguments else {}
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamError("The upstream returned tool call arguments that are not a JSON "
                            "object; Anthropic's tool_use input must be one.")
    return parsed


@reads_upstream("a chat completion")
def openai_to_ingress(completion: bytes, model: str) -> bytes:
    """An OpenAI ``chat.completion`` as an Anthropic Message (bytes).

    OpenAI does not say which stop sequence matched, so ``stop_sequence`` is null and a
    stop is ``end_turn``.  Cache writes are not in OpenAI's usage: 0.
    """
    data = _json_object(completion, "a chat completion")
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    refusal = message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    elif isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": _tool_input(fn.get("arguments"))})
    stop = _STOP.get(choice.get("finish_reason"), "end_turn")
    if isinstance(refusal, str) and refusal:
        stop = "refusal"
    return orjson.dumps({
        "id": _message_id(data.get("id")), "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": stop, "stop_sequence": None,
        "usage": _ingress_usage(data.get("usage"))})


class IngressStreamTranslator:
    """OpenAI chunk ``data`` in (and ``[DONE]``), Anthropic stream frames out.

    How this works: OpenAI deltas become Anthropic content blocks, opened when the kind
    of delta changes (text, or a new tool call) and closed before the next one opens or
    at the finish; Anthropic blocks cannot interleave, and OpenAI sends one tool call's
    argument fragments before the next call starts.

        input                          frames out
        -----------------------------  ---------------------------------------------
        first chunk                    message_start (input_tokens 0, see below)
        delta.content / refusal        [block_stop,] text block_start, text_delta
        delta.tool_calls, new call     [block_stop,] tool_use block_start,
                                       input_json_delta if arguments came along
        delta.tool_calls, arguments    input_json_delta on that call's block
        finish_reason                  block_stop of the open block; kept
        usage chunk (choices [])       nothing; kept
        [DONE]                         message_delta (stop_reason, usage), message_stop

    OpenAI reports usage only at the end, so message_start says ``input_tokens: 0`` and
    message_delta carries the final input, cache and output counts (the SDK's
    accumulator takes them from there).  A stream cut before ``[DONE]`` leaves ``done``
    False.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.usage: Usage | None = None
        self.done = False
        self.finish_reason: str | None = None
        self._raw_usage: dict[str, Any] | None = None
        self._started = False
        self._blocks = 0  # Anthropic blocks opened so far
        self._open: tuple[str, int] | None = None  # ("text", -1) or ("tool", OpenAI index)
        self._refused = False

    @reads_upstream("a stream chunk")
    def feed(self, data: str) -> list[bytes]:
        if self.done:
            return []
        if data == "[DONE]":
            return self._finish()
        chunk = _json_object(data, "a stream chunk")
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(self._message_start(chunk.get("id")))
        if isinstance(chunk.get("usage"), dict):
            self._raw_usage = chunk["usage"]
            self.usage = _hub_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self._refused = self._refused or key == "refusal"
                    if self._open != ("text", -1):
                        out += self._open_block("text", -1, {"type": "text", "text": ""})
                    out.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or []:
                out += self._tool_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                out += self._close()
        return out

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        fn = call.get("function") or {}
        if self._open != ("tool", index):
            if call.get("id") is None and fn.get("name") is None:
                raise UpstreamError("The upstream interleaved tool call arguments, which an "
                                    "Anthropic stream cannot carry.")
            out += self._open_block("tool", index, {"type": "tool_use", "id": call.get("id"),
                                                    "name": fn.get("name"), "input": {}})
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return out

    def _open_block(self, kind: str, key: int, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._open = (kind, key)
        out.append(_ingress_frame({"type": "content_block_start", "index": self._blocks,
                                   "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        self._blocks += 1
        return [_ingress_frame({"type": "content_block_stop", "index": self._blocks - 1})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _ingress_frame({"type": "content_block_delta", "index": self._blocks,
                               "delta": delta})

    def _message_start(self, chunk_id: Any) -> bytes:
        return _ingress_frame({"type": "message_start", "message": {
            "id": _message_id(chunk_id), "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _finish(self) -> list[bytes]:
        self.done = True
        out = [] if self._started else [self._message_start(None)]
        self._started = True
        out += self._close()
        stop = "refusal" if self._refused else _STOP.get(self.finish_reason, "end_turn")
        out.append(_ingress_frame({"type": "message_delta",
                                   "delta": {"stop_reason": stop, "stop_sequence": None},
                                   "usage": _ingress_usage(self._raw_usage)}))
        out.append(_ingress_frame({"type": "message_stop"}))
        return out


def _hub_usage(u: dict[str, Any]) -> Usage:
    details = u.get("prompt_tokens_details")
    out_details = u.get("completion_tokens_details")
    return Usage(prompt_tokens=count(u.get("prompt_tokens")),
                 completion_tokens=count(u.get("completion_tokens")),
                 cached_tokens=count(details.get("cached_tokens"))
                 if isinstance(details, dict) else 0,
                 reasoning_tokens=count(out_details.get("reasoning_tokens"))
                 if isinstance(out_details, dict) else 0)


def _ingress_frame(event: dict[str, Any]) -> bytes:
    return encode_event(orjson.dumps(event), event=event["type"])


def build_passthrough(body: dict[str, Any], dep: Deployment, base_url: str | None,
                      api_key: str | None) -> UpstreamRequest:
    """An Anthropic-ingress request to an Anthropic deployment: sent as the client wrote
    it, with only the model (and the gateway's provider key and API version) replaced."""
    out = dict(body)
    out["model"] = dep.model
    return UpstreamRequest("POST", join_url(base_url or DEFAULT_BASE_URL, "/v1/messages"),
                           _headers(api_key), request_json(out),
                           stream=out.get("stream") is True)


def usage_of(body: bytes) -> Usage | None:
    """The normalised usage of an Anthropic Message (a passthrough answer)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = message.get("usage") if isinstance(message, dict) else None
    return _usage_from(usage) if isinstance(usage, dict) else None
