"""Incremental server-sent events parser and writer: the pure-Python twin, and the reference.

Parsing follows the WHATWG HTML Standard, section 9.2.6 "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation),
with one change of model: the fields of an event (``event``, ``id``, ``retry``) are read
per event block and returned with the event, because the gateway forwards events; it does
not reconnect the way a browser's EventSource does.

How this works
--------------
Bytes arrive in chunks cut anywhere (inside a line, inside a UTF-8 sequence, between the
CR and the LF of a CRLF).  The parser keeps:

* ``_buf``: the bytes of the line not yet terminated (never contains CR or LF).  Lines
  are decoded only when complete, so a multi-byte character cut by the chunking is
  decoded whole.  UTF-8 errors become U+FFFD (errors="replace"), line by line; as line
  ends are ASCII, this equals decoding the whole stream at once.
* the current event block: the data lines (``None`` until a ``data`` field is seen),
  the ``event``, ``id`` and ``retry`` fields, and ``_block_bytes``, the bytes of the
  block's completed lines (line ends not counted; comments and unknown fields count).
* ``_skip_lf``: the last chunk ended with CR, so a LF opening the next chunk is the
  second half of that CRLF, not an empty line (which would dispatch an event).
* ``_bom_done``: a UTF-8 BOM (EF BB BF) at the very start of the stream is skipped once,
  even when it is split across chunks; until three bytes have been seen, a prefix of it
  waits in ``_buf`` (not counted against ``max_event_bytes`` unless it turns out to be
  data).

Per complete line (the spec's steps, as a table)::

    line                         action
    ---------------------------  ----------------------------------------------------
    "" (blank)                   dispatch: if a data field was seen, emit an SSEEvent;
                                 then reset the block (data, event, id, retry, size)
    ":" ...                      comment: ignored
    "data" [":" [" "] value]     append value to the data lines
    "event" [":" [" "] value]    event = value
    "id" [":" [" "] value]       id = value, unless value contains U+0000 (then ignored)
    "retry" [":" [" "] value]    retry = int(value) if value is only ASCII digits
    any other field name         ignored

A line without a colon is a field name with an empty value; one space after the colon is
stripped, no more.  A block without any ``data`` field is not dispatched; ``data:`` with
an empty value is (data "").  The data lines are joined with LF.

Parser states::

    state   input                      next    result
    ------  -------------------------  ------  ---------------------------------------
    open    feed(chunk)                open    the events completed by the chunk
    open    feed: block > max bytes    closed  SSEError; truncated = True
    open    close()                    closed  []; truncated = anything pending
    closed  feed(chunk)                closed  SSEError
    closed  close()                    closed  []

``max_event_bytes`` bounds the memory held for one event: when the bytes of one pending
block (its lines so far, line ends not counted, plus the unterminated line) exceed it,
``feed`` raises ``SSEError`` and the parser drops its buffers.  Whether a given stream
raises does not depend on how it was chunked (only which ``feed`` call raises does).

On ``close()`` an unterminated event is discarded, as the spec says; ``truncated`` tells
whether anything was pending (a partial line, or a block without its blank line), so the
gateway can tell a cut stream from a finished one.
"""
from __future__ import annotations

import re

from .errors import SSEError

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES", "SSEEvent", "SSEParser", "encode_event", "encode_comment",
]

# 16 MiB: far above any real event (OpenAI and Anthropic chunks are well under 64 KiB),
# small enough that a hostile upstream cannot make one stream hold much memory.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"\r\n?|\n")
_NEWLINES = re.compile(r"\r\n?|\n")
_object_setattr = object.__setattr__
_object_new = object.__new__


def _text(name: str, value: object) -> str:
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise TypeError(f"{name} must be str, not {type(value).__name__}")


class SSEEvent:
    """One dispatched event.  Immutable; compares equal to an equal ``SSEEvent``.

    ``event`` is "" when the block had no ``event`` field (the spec's default type
    "message" is not substituted), ``data`` the data lines joined with LF, ``id`` the
    block's ``id`` field or None, ``retry`` the block's valid ``retry`` field or None.
    """

    __slots__ = ("event", "data", "id", "retry")

    event: str
    data: str
    id: str | None
    retry: int | None

    def __init__(
        self, event: str = "", data: str = "", id: str | None = None, retry: int | None = None
    ) -> None:
        _object_setattr(self, "event", _text("event", event))
        _object_setattr(self, "data", _text("data", data))
        _object_setattr(self, "id", None if id is None else _text("id", id))
        _object_setattr(self, "retry", retry)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SSEEvent is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"SSEEvent is immutable: cannot delete {name!r}")

    def astuple(self) -> tuple[str, str, str | None, int | None]:
        """``(event, data, id, retry)``: compares across the two implementations."""
        return (self.event, self.data, self.id, self.retry)

    def __eq__(self, other: object) -> bool:
        if type(other) is not SSEEvent:
            return NotImplemented
        return self.astuple() == other.astuple()  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        if type(other) is not SSEEvent:
            return NotImplemented
        return self.astuple() != other.astuple()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.astuple())

    def __repr__(self) -> str:
        return (
            f"SSEEvent(event={self.event!r}, data={self.data!r}, "
            f"id={self.id!r}, retry={self.retry!r})"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None, int | None]]:
        return (SSEEvent, self.astuple())


def _new_event(event: str, data: str, id: str | None, retry: int | None) -> SSEEvent:
    """The parser's events: its values are already checked."""
    ev = _object_new(SSEEvent)
    _object_setattr(ev, "event", event)
    _object_setattr(ev, "data", data)
    _object_setattr(ev, "id", id)
    _object_setattr(ev, "retry", retry)
    return ev


class SSEParser:
    """Incremental parser of one event stream.

    ``feed(chunk)`` returns the events that chunk completed; ``close()`` ends the stream
    (always ``[]``) and sets ``truncated``.  See the module docstring for the rules.
    """

    __slots__ = (
        "_max_event_bytes", "_truncated", "_buf", "_data", "_event", "_id", "_retry",
        "_block_bytes", "_skip_lf", "_bom_done", "_closed",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if type(max_event_bytes) is not int:
            max_event_bytes = max_event_bytes.__index__()
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be at least 1")
        self._max_event_bytes = max_event_bytes
        self._truncated = False
        self._buf = b""
        self._data: list[bytes] | None = None
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._block_bytes = 0
        self._skip_lf = False
        self._bom_done = False
        self._closed = False

    @property
    def max_event_bytes(self) -> int:
        """The limit for one pending event block, in bytes."""
        return self._max_event_bytes

    @property
    def truncated(self) -> bool:
        """After ``close()``: True if a partial line or an unterminated block was pending."""
        return self._truncated

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse the next chunk of the stream; return the events it completed.

        ``chunk`` is any bytes-like object.  Raises ``SSEError`` after ``close()``, or
        when one pending event block grows beyond ``max_event_bytes``.
        """
        if self._closed:
            raise SSEError("SSEParser.feed() after close() or after an SSEError")
        if type(chunk) is not bytes:
            chunk = bytes(memoryview(chunk))
        if not chunk:
            return []
        if self._skip_lf:
            # The previous chunk ended with CR: a LF here completes that CRLF.
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if not self._bom_done:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._buf = buf  # maybe a BOM: wait for its third byte (not counted)
                return []
            self._bom_done = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        if b"\r" in buf:
            lines = _EOL.split(buf)
            # A CR at the very end may be the first half of a CRLF.
            self._skip_lf = buf[-1] == 0x0D
        else:
            lines = buf.split(b"\n")
        rest = lines.pop()

        events: list[SSEEvent] = []
        max_bytes = self._max_event_bytes
        block = self._block_bytes
        data = self._data
        for line in lines:
            if not line:  # blank line: dispatch
                if data is not None:
                    events.append(_new_event(
                        self._event, b"\n".join(data).decode("utf-8", "replace"),
                        self._id, self._retry,
                    ))
                    data = None
                self._event = ""
                self._id = None
                self._retry = None
                block = 0
                continue
            block += len(line)
            if block > max_bytes:
                self._fail()
            if line[0] == 0x3A:  # ":" comment
                continue
            if line.startswith(b"data:"):  # the common case first
                value = line[6:] if line[5:6] == b" " else line[5:]
                if data is None:
                    data = [value]
                else:
                    data.append(value)
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":  # "data" without a colon
                if data is None:
                    data = [value]
                else:
                    data.append(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\x00" not in value:
                    self._id = value.decode("utf-8", "replace")
            elif name == b"retry":
                if value.isdigit():  # bytes.isdigit: ASCII digits only, False if empty
                    try:
                        self._retry = int(value)
                    except ValueError:  # beyond sys.get_int_max_str_digits(): ignored
                        pass
        self._data = data
        self._block_bytes = block
        self._buf = rest
        self._check_pending(block + len(rest))
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: discard an unterminated event (per the spec) and return ``[]``.

        Sets ``truncated`` to True when a partial line or an event block without its
        terminating blank line was pending.  Calling it again changes nothing.
        """
        if not self._closed:
            self._closed = True
            self._truncated = bool(self._buf) or self._block_bytes > 0
            self._drop()
        return []

    def _check_pending(self, pending: int) -> None:
        if pending > self._max_event_bytes:
            self._fail()

    def _fail(self) -> None:
        self._closed = True
        self._truncated = True
        self._drop()
        raise SSEError(f"an event block exceeds max_event_bytes={self._max_event_bytes}")

    def _drop(self) -> None:
        self._buf = b""
        self._data = None
        self._event = ""
        self._id = None
        self._retry = None
        self._block_bytes = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SSEParser {state} pending={self._block_bytes + len(self._buf)}B>"


def _field_value(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    raw = value.encode("utf-8")
    if b"\r" in raw or b"\n" in raw:
        raise ValueError(f"an SSE {name} cannot contain CR or LF: {value!r}")
    return raw


def encode_event(
    data: str | bytes,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Frame one event: ``event:``, ``id:``, ``retry:`` lines if given, one ``data:`` line
    per line of ``data`` (split at CRLF, CR or LF), then the blank line.

    ``SSEParser`` parses the result back into exactly this event (its data with line
    ends normalised to LF).  An event or id containing CR or LF, or an id containing
    U+0000 (which the parser must ignore), raises ValueError; so does a negative retry.
    """
    parts: list[bytes] = []
    if event is not None:
        parts.append(b"event: " + _field_value("event", event) + b"\n")
    if id is not None:
        raw_id = _field_value("id", id)
        if b"\x00" in raw_id:
            raise ValueError(f"an SSE id cannot contain U+0000: {id!r}")
        parts.append(b"id: " + raw_id + b"\n")
    if retry is not None:
        if type(retry) is bool or not isinstance(retry, int):
            raise TypeError(f"retry must be int, not {type(retry).__name__}")
        if retry < 0:
            raise ValueError(f"retry must not be negative: {retry}")
        parts.append(b"retry: %d\n" % retry)
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raise TypeError(f"data must be str or bytes, not {type(data).__name__}")
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    parts.append(b"data: " + raw.replace(b"\n", b"\ndata: ") + b"\n\n")
    return b"".join(parts)


def encode_comment(text: str = "") -> bytes:
    """A comment block, ``: text`` and a blank line (``: ping`` keeps a stream alive).

    Each line of a multi-line text becomes its own comment line, so no text can end the
    comment early and inject a field.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in _NEWLINES.split(text)) + b"\n"
