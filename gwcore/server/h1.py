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

Checks beyond h11's (RFC 9112 sections 5.2 and 6.1 let a server reject these; smuggling
defences want it): Content-Length together with Transfer-Encoding is a 400, obsolete
line folding in the head is a 400 (h11 would unfold it), and a head larger than
``max_header_bytes`` is a 431 even when it arrived in one piece (h11 only bounds
*incomplete* heads).  To see folds, the raw bytes of the head being read are kept
(bounded by ``max_header_bytes``) until the head is parsed.
"""
from __future__ import annotations

from dataclasses import dataclass

import h11

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
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


class H1Connection:
    def __init__(self, *, max_header_bytes: int, max_body_bytes: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self.requests = 0
        self._head_bytes: bytearray | None = bytearray()  # None once this cycle's head is in

    # -- input --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        head = self._head_bytes
        if head is not None and len(head) <= self.max_header_bytes:
            head += data
        self._h11.receive_data(data)

    @property
    def buffered_bytes(self) -> int:
        return len(self._h11.trailing_data[0])

    @property
    def idle(self) -> bool:
        """No part of a request has arrived on this cycle yet."""
        return self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]

    def next_event(self) -> RequestHead | BodyChunk | EndOfBody | Closed | object:
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                raise ProtocolError(431, "Request header fields too large.") from exc
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
        headers = list(event.headers)  # (lowercased name, value)
        size = len(event.method) + len(event.target) + 12
        has_cl = has_te = False
        content_length = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                has_cl = True
                content_length = int(value)  # h11 validated the digits
            elif name == b"transfer-encoding":
                has_te = True
        if size > self.max_header_bytes:
            raise ProtocolError(431, "Request header fields too large.")
        if has_cl and has_te:
            raise ProtocolError(400, "Content-Length and Transfer-Encoding together are not allowed.")
        raw = self._head_bytes
        self._head_bytes = None
        if raw is not None:
            end = raw.find(b"\n\r\n")
            region = raw if end < 0 else raw[:end]
            if b"\n " in region or b"\n\t" in region:
                raise ProtocolError(400, "Obsolete line folding in headers is not allowed.")
        if content_length > self.max_body_bytes:
            raise ProtocolError(413, "Request body too large.")
        return RequestHead(bytes(event.method), bytes(event.target), headers,
                           bytes(event.http_version))

    # -- output -------------------------------------------------------------------
    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """Frame a response head.  Without content-length the body goes chunked."""
        return self._h11.send(h11.Response(status_code=status, headers=headers,
                                           reason=_REASONS.get(status, b"")))  # type: ignore[return-value]

    def response_body(self, data: bytes) -> bytes:
        return self._h11.send(h11.Data(data=data))  # type: ignore[return-value]

    def response_end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage())  # type: ignore[return-value]

    def response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        headers = headers + [(b"content-length", str(len(body)).encode())]
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
        return True
