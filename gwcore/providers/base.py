"""What every provider adapter produces and consumes: plain data, no I/O.

The gateway's internal ("hub") format is OpenAI chat completions.  An upstream adapter
turns an OpenAI chat request into its provider's request, and the provider's answers
(whole, streamed, or errors) back into OpenAI chat format.  Ingress adapters (the
Anthropic ``/v1/messages`` endpoint) translate the other way around the hub.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from gwcore.config import Deployment
from gwcore.errors import GatewayError, InvalidRequest, UpstreamError
from gwcore.wire import Usage

F = TypeVar("F", bound=Callable[..., Any])


def request_json(body: Any) -> bytes:
    """An upstream request body as JSON, or a 400 when it cannot be written.

    The gateway parses requests with orjson, which reads JSON nested up to 1024 levels
    but writes at most 254 (``orjson.JSONEncodeError``, a TypeError): a request nested
    deeper than that cannot be sent on, and it is the client's to fix.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(f"The request cannot be sent on as JSON ({exc}); JSON nested "
                             "more than 254 levels deep is not accepted.",
                             code="invalid_value") from exc


def count(value: Any) -> int:
    """A token count from an upstream's usage: a non-negative int, else 0.

    Usage feeds the accounting's arithmetic, so a string or a float in it would fail
    far from here (after the answer was sent); an upstream's nonsense counts nothing.
    """
    return value if type(value) is int and value >= 0 else 0


# What reading an answer of an unexpected shape raises: a string where an object
# belongs (AttributeError, TypeError), a list where a key goes (TypeError: unhashable),
# a missing element (KeyError, IndexError), JSON too deep to write back (TypeError) ...
_SHAPE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError)


def reads_upstream(what: str) -> Callable[[F], F]:
    """Decorator for translators of upstream answers (parsers, stream translators).

    An answer they cannot read raises ``UpstreamError`` (502, or a final SSE error
    event mid-stream) naming ``what``, with the original exception as its cause, instead
    of the bare TypeError or KeyError a 500, or a stream silently cut short, would come
    from.  GatewayErrors raised on purpose pass through unchanged.
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except GatewayError:
                raise
            except _SHAPE_ERRORS as exc:
                raise UpstreamError(f"The upstream sent {what} the gateway cannot read "
                                    f"({type(exc).__name__}).") from exc
        return guarded  # type: ignore[return-value]
    return decorate


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    stream: bool = False
    # True when the gateway added stream_options.include_usage itself, so the usage
    # chunk is accounted and then stripped from what the client sees.
    injected_usage: bool = False



class SSEEventLike(Protocol):
    event: str
    data: str
    id: str | None


class StreamTranslator(Protocol):
    """Provider SSE events in, OpenAI ``chat.completion.chunk`` SSE bytes out.

    ``feed`` takes one parsed upstream event (``gwnative.SSEEvent``) and returns zero or
    more complete SSE frames (``b"data: {...}\\n\\n"``) in OpenAI's chunk format; the
    final frame of a complete stream is ``b"data: [DONE]\\n\\n"``.  ``usage`` is the
    normalised usage once known; ``done`` is True once the provider signalled the
    end of the answer.  A provider error event raises a ``GatewayError``.
    """
    usage: Usage | None
    done: bool

    def feed(self, event: SSEEventLike) -> list[bytes]: ...


class ChatAdapter(Protocol):
    """One upstream API, spoken in OpenAI chat format: what a module in
    ``gwcore.providers`` offers (module-level functions; pure functions of their input).

    ``StreamTranslator(model, include_usage, created)`` is a class attribute of the
    module; a translator may also have ``close() -> list[bytes]``, called when the
    upstream body ended cleanly (for APIs without an end-of-stream event).
    """

    def build_chat(self, body: dict[str, Any], dep: Deployment, base_url: str,
                   api_key: str | None) -> UpstreamRequest: ...

    def parse_chat(self, body: bytes, model: str, created: int) -> tuple[bytes, Usage | None]: ...

    def map_error(self, status: int, body: bytes,
                  headers: list[tuple[str, str]]) -> GatewayError: ...
