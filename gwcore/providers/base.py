"""What every provider adapter produces and consumes: plain data, no I/O.

The gateway's internal ("hub") format is OpenAI chat completions.  An upstream adapter
turns an OpenAI chat request into its provider's request, and the provider's answers
(whole, streamed, or errors) back into OpenAI chat format.  Ingress adapters (the
Anthropic ``/v1/messages`` endpoint) translate the other way around the hub.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gwcore.config import Deployment
from gwcore.errors import GatewayError
from gwcore.wire import Usage


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
