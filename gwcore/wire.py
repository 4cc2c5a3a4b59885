"""msgspec views of the few response fields the gateway reads, decoded without
building the whole object tree."""
from __future__ import annotations

from dataclasses import dataclass

import msgspec


@dataclass(slots=True)
class Usage:
    """Token usage, normalised across providers (OpenAI's meaning of each field).

    ``prompt_tokens`` counts every input token, cached ones included;
    ``cached_tokens`` are the part read from the provider's prompt cache and
    ``cache_write_tokens`` the part written to it (Anthropic bills both differently);
    ``completion_tokens`` counts every output token, reasoning ones included, and
    ``reasoning_tokens`` is that part.
    """
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = 0


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = 0


class _OpenAIUsage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _UsageView(msgspec.Struct):
    usage: _OpenAIUsage | None = None


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class _ErrorView(msgspec.Struct):
    error: _ErrorDetail | str | None = None


_usage_decoder = msgspec.json.Decoder(_UsageView)
_error_decoder = msgspec.json.Decoder(_ErrorView)


def openai_usage(body: bytes | str) -> Usage | None:
    """The ``usage`` of an OpenAI response or chunk, or None (also on bad JSON)."""
    try:
        u = _usage_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if u is None:
        return None
    return Usage(
        prompt_tokens=u.prompt_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
        cached_tokens=(u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0,
        reasoning_tokens=(u.completion_tokens_details.reasoning_tokens or 0)
        if u.completion_tokens_details else 0,
    )


def openai_error(body: bytes) -> _ErrorDetail | None:
    try:
        err = _error_decoder.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(err, str):
        return _ErrorDetail(message=err)
    return err


class _InDetails(msgspec.Struct):
    cached_tokens: int | None = 0


class _OutDetails(msgspec.Struct):
    reasoning_tokens: int | None = 0


class _ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = 0
    output_tokens: int | None = 0
    input_tokens_details: _InDetails | None = None
    output_tokens_details: _OutDetails | None = None


class _ResponseView(msgspec.Struct):
    usage: _ResponsesUsage | None = None


class _ResponsesEventView(msgspec.Struct):
    type: str = ""
    response: _ResponseView | None = None


_responses_decoder = msgspec.json.Decoder(_ResponseView)
_responses_event_decoder = msgspec.json.Decoder(_ResponsesEventView)

# Events that end a Responses API stream (it sends no [DONE]).
RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _responses_usage(u: _ResponsesUsage | None) -> Usage | None:
    if u is None:
        return None
    return Usage(prompt_tokens=u.input_tokens or 0, completion_tokens=u.output_tokens or 0,
                 cached_tokens=(u.input_tokens_details.cached_tokens or 0)
                 if u.input_tokens_details else 0,
                 reasoning_tokens=(u.output_tokens_details.reasoning_tokens or 0)
                 if u.output_tokens_details else 0)


def responses_usage(body: bytes | str) -> Usage | None:
    """The usage of a Responses API ``response`` object."""
    try:
        return _responses_usage(_responses_decoder.decode(body).usage)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def responses_event(data: str) -> tuple[str, Usage | None]:
    """(event type, usage if it is a final event) of one Responses API stream event."""
    try:
        ev = _responses_event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "", None
    usage = _responses_usage(ev.response.usage) if ev.response is not None else None
    return ev.type, usage
