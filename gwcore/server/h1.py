"""Sans-IO HTTP/1.1 over h11, with the gateway's limits.  No trio, no sockets.

How this works: bytes go in with ``receive_data``; ``next_event`` returns one of
``RequestHead``, ``BodyChunk``, ``EndOfBody``, ``NEED_DATA``, ``PAUSED`` or ``CLOSED``,
or raises ``ProtocolError`` carrying the status to answer with (400, 413, 431, 501).
Responses are framed by the ``response_*`` methods, which return bytes to send.

    state          event in                 what happens
    -----          --------                 ------------
    idle           request head             RequestHead (after the 431/400/413 checks)
    head read      body bytes               BodyChunk ... (413 once over max_body_bytes)
    body read      end of body              EndOfBody, then PAUSED until start_next_cycle
    any            malformed bytes          ProtocolError(400); the connection must close
    done           start_next_cycle()       True: idle again (keep-alive); False: close

Checks beyond h11's, against request smuggling (RFC 9112 lets a server reject each of
these; a proxy in front of the gateway may frame such a request differently than h11,
so the only safe answer is a 400 and a close):

    input                                          answer  where h11 alone would
    ---------------------------------------------  ------  ---------------------------
    Content-Length with Transfer-Encoding          400     (400 too, since h11 0.16)
    Content-Length twice, or "5, 5" (§6.3 item 5)  400     merge identical values
    obsolete line folding (§5.2)                   400     unfold it
    a bare LF or bare CR in the head (§2.2)        400     take LF as a line end
    Transfer-Encoding not ending in chunked, or    400     501
      chunked twice (§6.3 item 4, §7.1)
    other codings before chunked ("gzip, chunked") 501     501 (§6.1: not understood)
    a chunk-size line that is not 1*16HEXDIG       400     accept 20 digits and any
      [chunk-ext] CRLF with token/quoted ext (§7.1)          ";..." extension bytes
    a chunk larger than max_body_bytes allows      413     read on until it is exceeded
    Transfer-Encoding in an HTTP/1.0 request (§6.1) 400     read it chunked
    an HTTP version other than 1.0 and 1.1         505     answer as HTTP/1.1

A head (request line through the blank line's CRLF) longer than ``max_header_bytes`` is
a 431 also when it arrived in one piece (h11 only bounds *incomplete* heads, by the
same measure, so the boundary does not depend on how the bytes arrived).  To see what
h11 normalises away, the raw bytes of the head being read are kept (bounded by
``max_header_bytes``) until the head is parsed, and a chunked body's framing lines are
checked by ``_ChunkedCheck`` as the bytes arrive (h11 discards chunk extensions unseen).

A response to HEAD has its head only (RFC 9110 §9.3.2): the body bytes the handler
gives are dropped, the Content-Length stays.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gwcore._h11 import h11, split_fields, with_fields

NEED_DATA = h11.NEED_DATA
PAUSED = h11.PAUSED


class Closed:
    """The peer closed its side cleanly between requests."""


CLOSED = Closed()


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased by h11
    http_version: bytes


@dataclass(slots=True)
class BodyChunk:
    data: bytes


class EndOfBody:
    __slots__ = ()


END_OF_BODY = EndOfBody()


class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request",
            401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout",
            505: b"HTTP Version Not Supported"}

# h11's end of a head: the first empty line, with or without its CR.
_BLANK_LINE = re.compile(rb"\n\r?\n")
_SUPPORTED_VERSIONS = (b"1.0", b"1.1")


def _crlf_head(raw: bytes | bytearray, end: re.Match[bytes] | None) -> bytes | None:
    """The head at the start of ``raw`` (up to the blank line ``end``, if found), or
    None when it is not framed by CRLF only: a bare LF, or a bare CR."""
    region = bytes(raw[:end.start() + 1] if end else raw)
    crlf = region.count(b"\r\n")
    if region.count(b"\n") != crlf or region.count(b"\r") != crlf:
        return None
    return region


def _head_lines(raw: bytes | bytearray | None) -> list[bytes] | None:
    """The lines of the head at the start of ``raw`` (request line first, CRLF-split),
    or None when it is not framed by CRLF only."""
    region = None if raw is None else _crlf_head(raw, _BLANK_LINE.search(raw))
    return None if region is None else region.split(b"\r\n")


def _fields(lines: list[bytes], name: bytes) -> list[bytes]:
    """The raw values of every field called ``name`` (lowercase) in the head lines."""
    out = []
    for line in lines[1:]:
        field, sep, value = line.partition(b":")
        if sep and field.lower() == name:
            out.append(value.strip(b" \t"))
    return out


def _transfer_coding_status(raw: bytes | bytearray | None) -> int:
    """400 or 501 for a Transfer-Encoding h11 refused (it says 501 for all of them)."""
    lines = _head_lines(raw)
    if lines is None:
        return 400
    codings = [c.strip(b" \t").lower() for v in _fields(lines, b"transfer-encoding")
               for c in v.split(b",")]
    codings = [c for c in codings if c]  # RFC 9110 §5.6.1: empty list elements don't count
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        return 400  # the body's length cannot be determined: RFC 9112 §6.3 item 4
    return 501  # chunked last, after a coding the gateway does not decode


class H1Connection:
    def __init__(self, *, max_header_bytes: int, max_body_bytes: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self.requests = 0
        self._head_bytes: bytearray | None = bytearray()  # None once this cycle's head is in
        self._chunks: _ChunkedCheck | None = None  # this cycle's chunked body, if any
        self._head_request = False  # this cycle's request is HEAD: answers have no body

    # -- input --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        head = self._head_bytes
        if head is not None and len(head) <= self.max_header_bytes:
            head += data
        chunks = self._chunks
        if chunks is not None and not chunks.done:
            chunks.feed(data)
        self._h11.receive_data(data)

    @property
    def buffered_bytes(self) -> int:
        return len(self._h11.trailing_data[0])

    @property
    def idle(self) -> bool:
        """No part of a request has arrived on this cycle yet."""
        return self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]

    def next_event(self) -> RequestHead | BodyChunk | EndOfBody | Closed | object:
        chunks = self._chunks
        if chunks is not None and chunks.error is not None:
            raise chunks.error
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                raise ProtocolError(431, "Request header fields too large.") from exc
            if status == 501:  # h11 says 501 for every Transfer-Encoding but chunked
                status = _transfer_coding_status(self._head_bytes)
            raise ProtocolError(status if status in (400, 501) else 400,
                                f"Malformed HTTP request: {exc}") from exc
        t = type(event)
        if t is h11.Data:
            self._body_bytes += len(event.data)
            if self._body_bytes > self.max_body_bytes:
                raise ProtocolError(413, "Request body too large.")
            return BodyChunk(bytes(event.data))
        if t is h11.Request:
            return self._head(event)
        if t is h11.EndOfMessage:
            return END_OF_BODY
        if t is h11.ConnectionClosed:
            return CLOSED
        return event  # NEED_DATA or PAUSED

    def _head(self, event: h11.Request) -> RequestHead:
        self.requests += 1
        self._body_bytes = 0
        self._head_request = event.method == b"HEAD"
        headers = list(event.headers)  # (lowercased name, value)
        has_cl = has_te = False
        content_length = 0
        for name, value in headers:
            if name == b"content-length":
                has_cl = True
                content_length = int(value)  # h11 validated the digits
            elif name == b"transfer-encoding":
                has_te = True
        raw = self._head_bytes
        self._head_bytes = None
        # The head's own bytes, request line to blank line: the bound h11 puts on an
        # incomplete head, so a head is judged alike however it arrived.
        end = _BLANK_LINE.search(raw) if raw is not None else None
        if end is None or end.end() > self.max_header_bytes:
            raise ProtocolError(431, "Request header fields too large.")
        if has_cl and has_te:
            raise ProtocolError(400, "Content-Length and Transfer-Encoding together are not allowed.")
        if has_te and event.http_version == b"1.0":
            # RFC 9112 §6.1: HTTP/1.0 has no chunked framing; the message is faulty.
            raise ProtocolError(400, "Transfer-Encoding is not allowed in HTTP/1.0.")
        # Checked on the bytes at once (C speed), not line by line: a header line
        # starts right after a CRLF, and no line holds a bare CR or LF.
        region = _crlf_head(raw, end)  # type: ignore[arg-type]
        if region is None:
            raise ProtocolError(400, "Header lines must end with CRLF (no bare CR or LF).")
        if b"\r\n " in region or b"\r\n\t" in region:
            raise ProtocolError(400, "Obsolete line folding in headers is not allowed.")
        if has_cl:
            low = region.lower()
            at = low.find(b"\r\ncontent-length:")
            if at < 0 or low.find(b"\r\ncontent-length:", at + 2) >= 0 \
                    or b"," in region[at + 17:region.index(b"\r\n", at + 2)]:
                raise ProtocolError(400, "Content-Length must be given once, as one number.")
        if event.http_version not in _SUPPORTED_VERSIONS:
            raise ProtocolError(505, "Only HTTP/1.0 and HTTP/1.1 are supported.")
        if content_length > self.max_body_bytes:
            raise ProtocolError(413, "Request body too large.")
        if has_te:
            # The bytes after the head are still in h11's buffer: check them from there.
            self._chunks = _ChunkedCheck(self.max_body_bytes)
            self._chunks.feed(self._h11.trailing_data[0])
            if self._chunks.error is not None:
                raise self._chunks.error
        return RequestHead(bytes(event.method), bytes(event.target), headers,
                           bytes(event.http_version))

    # -- output -------------------------------------------------------------------
    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """Frame a response head.  Without content-length the body goes chunked."""
        framing, block = split_fields(headers)
        return with_fields(self._h11.send(h11.Response(  # type: ignore[arg-type]
            status_code=status, headers=framing, reason=_REASONS.get(status, b""))), block)

    def response_body(self, data: bytes) -> bytes:
        if self._head_request:
            return b""  # RFC 9110 §9.3.2: the head of the GET answer, without its body
        return self._h11.send(h11.Data(data=data))  # type: ignore[return-value]

    def response_end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage())  # type: ignore[return-value]

    def response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        headers = headers + [(b"content-length", b"%d" % len(body))]
        return b"".join((self.response_head(status, headers), self.response_body(body),
                         self.response_end()))

    def error_response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """A response after a protocol error; the connection closes after it.

        h11 still lets the server send a response after the peer's protocol error as
        long as it has not started one; if it has, nothing more can be said.
        """
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        headers = headers + [(b"connection", b"close")]
        try:
            return self.response(status, headers, body)
        except h11.LocalProtocolError:
            return b""

    # -- cycle --------------------------------------------------------------------
    @property
    def response_started(self) -> bool:
        return self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def response_done(self) -> bool:
        return self._h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def keep_alive(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def start_next_cycle(self) -> bool:
        """True when the connection can serve another request."""
        if not self.keep_alive:
            return False
        self._h11.start_next_cycle()
        self._head_bytes = bytearray(self._h11.trailing_data[0][: self.max_header_bytes + 1])
        self._chunks = None
        self._head_request = False
        return True


# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, with chunk-ext = *( BWS ";" BWS name
# [ BWS "=" BWS ( token / quoted-string ) ] ).  Trailing whitespace is let through, as
# h11 does.  16 hex digits: a size that does not fit 64 bits is refused rather than
# read, since parsers that wrap around would frame it differently.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN
    + rb"|" + _QUOTED + rb"))?)*[ \t]*\r\n")
# Longer chunk-size lines are refused: no sane client sends kilobytes of extensions.
MAX_CHUNK_LINE_BYTES = 4096
# The trailer section is a small head; the gateway reads no trailer field at all.
MAX_TRAILER_BYTES = 16 * 1024


class _ChunkedCheck:
    """Follows a chunked body's framing beside h11 and checks what h11 lets through.

    How this works: fed the bytes after the head, it reads chunk-size lines strictly
    (``_CHUNK_LINE``), skips each chunk's data and checks the CRLF after it, then reads
    the trailer section up to its empty line (each line must end with CRLF), and is done:
    later bytes belong to the next request.  The first problem is kept in ``error``
    (400, or 413 when the declared sizes pass ``max_body_bytes``) and raised by
    ``H1Connection.next_event`` before h11 sees further events.

        state    input                           next
        -------  ------------------------------  -------------------------------------
        size     a valid line, size n > 0        data (n bytes)
        size     a valid line, size 0            trailer
        data     n bytes                         crlf
        crlf     CRLF                            size
        trailer  a CRLF-ended field line         trailer
        trailer  CRLF                            done
        any      anything else                   error set; fed no more
    """

    __slots__ = ("max_body_bytes", "declared", "state", "left", "line", "trailer_bytes",
                 "error")

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.declared = 0
        self.state = "size"
        self.left = 0
        self.line = bytearray()
        self.trailer_bytes = 0
        self.error: ProtocolError | None = None

    @property
    def done(self) -> bool:
        return self.state == "done" or self.error is not None

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.state = "crlf"
                continue
            if self.state == "crlf":  # the CRLF after a chunk's data, maybe split
                take = min(2 - len(self.line), n - i)
                self.line += data[i:i + take]
                i += take
                if not b"\r\n".startswith(self.line):
                    self._fail(400, "A chunk's data must be followed by CRLF.")
                elif len(self.line) == 2:
                    self.line.clear()
                    self.state = "size"
                continue
            j = data.find(b"\n", i)
            end = n if j < 0 else j + 1
            self.line += data[i:end]
            i = end
            if self.state == "size" and len(self.line) > MAX_CHUNK_LINE_BYTES:
                self._fail(400, "A chunk-size line is too long.")
            elif self.trailer_bytes + len(self.line) > MAX_TRAILER_BYTES:
                self._fail(431, "Request trailer fields too large.")
            elif j >= 0:
                line = bytes(self.line)
                self.line.clear()
                if self.state == "size":
                    self._size_line(line)
                else:
                    self._trailer_line(line)

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            self._fail(400, "Malformed chunk-size line in a chunked body.")
            return
        size = int(m.group(1), 16)
        self.declared += size
        if self.declared > self.max_body_bytes:
            self._fail(413, "Request body too large.")
        elif size:
            self.state, self.left = "data", size
        else:
            self.state = "trailer"

    def _trailer_line(self, line: bytes) -> None:
        self.trailer_bytes += len(line)
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._fail(400, "Trailer lines must end with CRLF (no bare CR or LF).")
        elif line == b"\r\n":
            self.state = "done"
        elif line[:1] in (b" ", b"\t"):
            self._fail(400, "Obsolete line folding in trailers is not allowed.")

    def _fail(self, status: int, message: str) -> None:
        self.error = ProtocolError(status, message)
