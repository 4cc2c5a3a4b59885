"""What every provider adapter produces and consumes: plain data, no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(slots=True)
class StreamState:
    """What a stream translator learned on the way (for accounting and the log)."""
    usage: Usage | None = None
    events: int = 0
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)
