# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Incremental server-sent events parser and writer: the compiled twin of ``_sse_py``.

Same API, same results, same exceptions; ``_sse_py`` is the reference and documents the
rules (WHATWG HTML, "Interpreting an event stream").

How this one is fast: a line that lies wholly inside a chunk is parsed where it is, in
the chunk's own memory (``memchr`` finds LF; the next CR position is cached per chunk,
so LF-only streams scan for CR once per chunk).  Only an unterminated line is copied, to
``line``, and completed from the next chunk.  Data lines are appended to ``data``, a C
buffer, and decoded once, at dispatch, straight into the event's ``str``.  The last
event name is cached, so Anthropic-style streams (``event:`` on every block) decode it
once.  ``SSEEvent`` objects come from a free list.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy

from .errors import SSEError

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES", "SSEEvent", "SSEParser", "encode_event", "encode_comment",
]

# 16 MiB: far above any real event (OpenAI and Anthropic chunks are well under 64 KiB),
# small enough that a hostile upstream cannot make one stream hold much memory.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

cdef str EMPTY = ""


cdef str text(str name, object value):
    if type(value) is str:
        return <str>value
    if isinstance(value, str):
        return str.__str__(value)
    raise TypeError(f"{name} must be str, not {type(value).__name__}")


@cython.freelist(64)
@cython.final
cdef class SSEEvent:
    """One dispatched event.  Immutable; compares equal to an equal ``SSEEvent``.

    ``event`` is "" when the block had no ``event`` field (the spec's default type
    "message" is not substituted), ``data`` the data lines joined with LF, ``id`` the
    block's ``id`` field or None, ``retry`` the block's valid ``retry`` field or None.
    """

    cdef readonly str event
    cdef readonly str data
    cdef readonly str id
    cdef readonly object retry

    def __init__(self, event="", data="", id=None, retry=None):
        self.event = text("event", event)
        self.data = text("data", data)
        self.id = None if id is None else text("id", id)
        self.retry = retry

    def astuple(self):
        """``(event, data, id, retry)``: compares across the two implementations."""
        return (self.event, self.data, self.id, self.retry)

    def __eq__(self, other):
        if type(other) is not SSEEvent:
            return NotImplemented
        return self.astuple() == (<SSEEvent>other).astuple()

    def __ne__(self, other):
        if type(other) is not SSEEvent:
            return NotImplemented
        return self.astuple() != (<SSEEvent>other).astuple()

    def __hash__(self):
        return hash(self.astuple())

    def __repr__(self):
        return (
            f"SSEEvent(event={self.event!r}, data={self.data!r}, "
            f"id={self.id!r}, retry={self.retry!r})"
        )

    def __reduce__(self):
        return (SSEEvent, self.astuple())


cdef inline int grow(char** buf, Py_ssize_t* cap, Py_ssize_t need) except -1:
    """Make ``*buf`` hold at least ``need`` bytes (amortised doubling)."""
    cdef Py_ssize_t new_cap = cap[0] * 2
    cdef char* p
    if new_cap < need:
        new_cap = need
    if new_cap < 256:
        new_cap = 256
    p = <char*>realloc(buf[0], <size_t>new_cap)
    if p == NULL:
        raise MemoryError()
    buf[0] = p
    cap[0] = new_cap
    return 0


cdef inline str decode(const char* p, Py_ssize_t n):
    if n == 0:
        return EMPTY
    return PyUnicode_DecodeUTF8(<char*>p, n, "replace")


@cython.final
cdef class SSEParser:
    """Incremental parser of one event stream.

    ``feed(chunk)`` returns the events that chunk completed; ``close()`` ends the stream
    (always ``[]``) and sets ``truncated``.  See ``_sse_py`` for the rules.
    """

    cdef Py_ssize_t _max
    cdef readonly bint truncated
    # the unterminated line (or, before the BOM check is done, a BOM prefix)
    cdef char* line
    cdef Py_ssize_t line_len, line_cap
    # the current block
    cdef char* data
    cdef Py_ssize_t data_len, data_cap
    cdef bint has_data
    cdef str event
    cdef str id
    cdef object retry
    cdef Py_ssize_t block_bytes
    cdef bint skip_lf, bom_done, closed
    # the last decoded event name, to decode a repeated one only once
    cdef bytes last_event_raw
    cdef str last_event

    def __cinit__(self):
        self.line = NULL
        self.data = NULL
        self.event = EMPTY
        self.last_event_raw = b""
        self.last_event = EMPTY

    def __init__(self, max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
        cdef object m = max_event_bytes.__index__()
        if m < 1:
            raise ValueError("max_event_bytes must be at least 1")
        if m > <object>PY_SSIZE_T_MAX_HALF:
            m = <object>PY_SSIZE_T_MAX_HALF
        self._max = m

    def __dealloc__(self):
        free(self.line)
        free(self.data)

    @property
    def max_event_bytes(self):
        """The limit for one pending event block, in bytes."""
        return self._max

    def feed(self, chunk):
        """Parse the next chunk of the stream; return the events it completed.

        ``chunk`` is any bytes-like object.  Raises ``SSEError`` after ``close()``, or
        when one pending event block grows beyond ``max_event_bytes``.
        """
        if self.closed:
            raise SSEError("SSEParser.feed() after close() or after an SSEError")
        if not PyBytes_CheckExact(chunk):
            chunk = bytes(memoryview(chunk))  # any bytes-like object, as the twin does
        return self._feed(PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk))

    cdef list _feed(self, const char* buf, Py_ssize_t n):
        cdef list out = []
        cdef Py_ssize_t pos = 0, e, cr = -1, need, k
        if n == 0:
            return out
        if self.skip_lf:
            # The previous chunk ended with CR: a LF here completes that CRLF.
            self.skip_lf = False
            if buf[0] == b'\n':
                pos = 1
        if not self.bom_done:
            # line holds the BOM bytes seen so far (0 to 2 of them).
            need = 3 - self.line_len
            k = 0
            while k < need and pos + k < n and buf[pos + k] == BOM[self.line_len + k]:
                k += 1
            if k == need:  # a whole BOM: skip it
                self.line_len = 0
                pos += k
                self.bom_done = True
            elif pos + k == n:  # all of the chunk matched: still maybe a BOM
                if self.line_len + k > self.line_cap:
                    grow(&self.line, &self.line_cap, self.line_len + k)
                memcpy(self.line + self.line_len, buf + pos, <size_t>k)
                self.line_len += k  # not counted against the limit until it is data
                return out
            else:  # not a BOM: the bytes kept so far are the start of the first line
                self.bom_done = True
        if pos >= n:
            return out

        if self.line_len > 0:
            # Complete the line carried over from the last chunk.
            e = self._find_eol(buf, pos, n, &cr)
            if e == n:
                self._append_line(buf + pos, n - pos)
                return out
            self._append_line(buf + pos, e - pos)
            self._line(self.line, self.line_len, out)
            self.line_len = 0
            pos = self._after_eol(buf, e, n)

        while pos < n:
            e = self._find_eol(buf, pos, n, &cr)
            if e == n:
                self._append_line(buf + pos, n - pos)
                break
            self._line(buf + pos, e - pos, out)
            pos = self._after_eol(buf, e, n)
        return out

    cdef inline Py_ssize_t _find_eol(self, const char* buf, Py_ssize_t pos, Py_ssize_t n,
                                     Py_ssize_t* cr):
        """Index of the next CR or LF at or after pos, or n."""
        cdef const char* hit = <const char*>memchr(buf + pos, b'\n', <size_t>(n - pos))
        cdef Py_ssize_t nl = n if hit == NULL else hit - buf
        if cr[0] < pos:  # the cached CR is behind us: look for the next one
            hit = <const char*>memchr(buf + pos, b'\r', <size_t>(n - pos))
            cr[0] = n if hit == NULL else hit - buf
        return cr[0] if cr[0] < nl else nl

    cdef inline Py_ssize_t _after_eol(self, const char* buf, Py_ssize_t e, Py_ssize_t n):
        if buf[e] == b'\n':
            return e + 1
        if e + 1 < n:
            return e + 2 if buf[e + 1] == b'\n' else e + 1
        self.skip_lf = True  # CR at the chunk's end: a LF may follow in the next chunk
        return e + 1

    cdef int _append_line(self, const char* p, Py_ssize_t k) except -1:
        """Keep the unterminated part of a line, within the block's size limit."""
        if self.block_bytes + self.line_len + k > self._max:
            self._fail()
        if self.line_len + k > self.line_cap:
            grow(&self.line, &self.line_cap, self.line_len + k)
        if k:
            memcpy(self.line + self.line_len, p, <size_t>k)
        self.line_len += k
        return 0

    cdef int _line(self, const char* p, Py_ssize_t n, list out) except -1:
        """Interpret one complete line (without its line end)."""
        cdef const char* colon
        cdef const char* v
        cdef Py_ssize_t name_len, vlen, i
        cdef long long r
        if n == 0:
            self._dispatch(out)
            return 0
        self.block_bytes += n
        if self.block_bytes > self._max:
            self._fail()
        if p[0] == b':':
            return 0
        colon = <const char*>memchr(p, b':', <size_t>n)
        if colon == NULL:
            name_len = n
            v = p + n
            vlen = 0
        else:
            name_len = colon - p
            v = colon + 1
            vlen = n - name_len - 1
            if vlen > 0 and v[0] == b' ':
                v += 1
                vlen -= 1
        if name_len == 4 and memcmp(p, b"data", 4) == 0:
            if self.has_data:
                if self.data_len + 1 + vlen > self.data_cap:
                    grow(&self.data, &self.data_cap, self.data_len + 1 + vlen)
                self.data[self.data_len] = b'\n'
                self.data_len += 1
            else:
                self.has_data = True
                if vlen > self.data_cap:
                    grow(&self.data, &self.data_cap, vlen)
            if vlen:
                memcpy(self.data + self.data_len, v, <size_t>vlen)
                self.data_len += vlen
        elif name_len == 5 and memcmp(p, b"event", 5) == 0:
            if vlen == PyBytes_GET_SIZE(self.last_event_raw) and (
                    memcmp(v, PyBytes_AS_STRING(self.last_event_raw), <size_t>vlen) == 0):
                self.event = self.last_event
            else:
                self.event = decode(v, vlen)
                self.last_event_raw = PyBytes_FromStringAndSize(v, vlen)
                self.last_event = self.event
        elif name_len == 2 and p[0] == b'i' and p[1] == b'd':
            if memchr(v, 0, <size_t>vlen) == NULL:
                self.id = decode(v, vlen)
        elif name_len == 5 and memcmp(p, b"retry", 5) == 0:
            if vlen == 0:
                return 0
            for i in range(vlen):
                if v[i] < b'0' or v[i] > b'9':
                    return 0
            if vlen <= 18:
                r = 0
                for i in range(vlen):
                    r = r * 10 + (v[i] - 48)
                self.retry = r
            else:
                try:
                    self.retry = int(PyBytes_FromStringAndSize(v, vlen))
                except ValueError:  # beyond sys.get_int_max_str_digits(): ignored
                    pass
        return 0

    cdef int _dispatch(self, list out) except -1:
        cdef SSEEvent ev
        if self.has_data:
            ev = SSEEvent.__new__(SSEEvent)
            ev.event = self.event
            ev.data = decode(self.data, self.data_len)
            ev.id = self.id
            ev.retry = self.retry
            out.append(ev)
            self.has_data = False
            self.data_len = 0
        self.event = EMPTY
        self.id = None
        self.retry = None
        self.block_bytes = 0
        return 0

    def close(self):
        """End of stream: discard an unterminated event (per the spec) and return ``[]``.

        Sets ``truncated`` to True when a partial line or an event block without its
        terminating blank line was pending.  Calling it again changes nothing.
        """
        if not self.closed:
            self.closed = True
            self.truncated = self.line_len > 0 or self.block_bytes > 0
            self._drop()
        return []

    cdef int _fail(self) except -1:
        self.closed = True
        self.truncated = True
        self._drop()
        raise SSEError(f"an event block exceeds max_event_bytes={self._max}")

    cdef void _drop(self):
        free(self.line)
        free(self.data)
        self.line = NULL
        self.data = NULL
        self.line_len = self.line_cap = 0
        self.data_len = self.data_cap = 0
        self.has_data = False
        self.event = EMPTY
        self.id = None
        self.retry = None
        self.block_bytes = 0

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<SSEParser {state} pending={self.block_bytes + self.line_len}B>"


cdef const char* BOM = b"\xef\xbb\xbf"
cdef Py_ssize_t PY_SSIZE_T_MAX_HALF = (<Py_ssize_t>(<size_t>-1 >> 1)) // 2


cdef bytes field_value(str name, object value):
    cdef Py_ssize_t n
    cdef const char* p
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    p = PyUnicode_AsUTF8AndSize(value, &n)
    if memchr(p, b'\r', <size_t>n) != NULL or memchr(p, b'\n', <size_t>n) != NULL:
        raise ValueError(f"an SSE {name} cannot contain CR or LF: {value!r}")
    return PyBytes_FromStringAndSize(p, n)


def encode_event(data, event=None, id=None, retry=None):
    """Frame one event: ``event:``, ``id:``, ``retry:`` lines if given, one ``data:`` line
    per line of ``data`` (split at CRLF, CR or LF), then the blank line.

    ``SSEParser`` parses the result back into exactly this event (its data with line
    ends normalised to LF).  An event or id containing CR or LF, or an id containing
    U+0000 (which the parser must ignore), raises ValueError; so does a negative retry.
    """
    cdef bytes ev_raw = None, id_raw = None, retry_raw = None, result
    cdef const char* p
    cdef Py_ssize_t n, i, lines, crlf, total
    cdef char* w
    if event is not None:
        ev_raw = field_value("event", event)
    if id is not None:
        id_raw = field_value("id", id)
        if memchr(PyBytes_AS_STRING(id_raw), 0, <size_t>PyBytes_GET_SIZE(id_raw)) != NULL:
            raise ValueError(f"an SSE id cannot contain U+0000: {id!r}")
    if retry is not None:
        if type(retry) is bool or not isinstance(retry, int):
            raise TypeError(f"retry must be int, not {type(retry).__name__}")
        if retry < 0:
            raise ValueError(f"retry must not be negative: {retry}")
        retry_raw = b"%d" % retry
    if isinstance(data, str):
        p = PyUnicode_AsUTF8AndSize(data, &n)
    elif PyBytes_CheckExact(data):
        p = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        p = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        raise TypeError(f"data must be str or bytes, not {type(data).__name__}")
    # Size: every line end of data becomes "\ndata: " (a CRLF counts once).
    lines = 1
    crlf = 0
    i = 0
    if memchr(p, b'\n', <size_t>n) == NULL and memchr(p, b'\r', <size_t>n) == NULL:
        i = n  # one line: the common case
    while i < n:
        if p[i] == b'\n':
            lines += 1
        elif p[i] == b'\r':
            lines += 1
            if i + 1 < n and p[i + 1] == b'\n':
                crlf += 1
                i += 1
        i += 1
    total = (n - crlf) + 6 * lines + 2
    if ev_raw is not None:
        total += 8 + PyBytes_GET_SIZE(ev_raw)
    if id_raw is not None:
        total += 5 + PyBytes_GET_SIZE(id_raw)
    if retry_raw is not None:
        total += 8 + PyBytes_GET_SIZE(retry_raw)
    result = PyBytes_FromStringAndSize(NULL, total)
    w = PyBytes_AS_STRING(result)
    if ev_raw is not None:
        w = put(w, b"event: ", 7)
        w = put(w, PyBytes_AS_STRING(ev_raw), PyBytes_GET_SIZE(ev_raw))
        w = put(w, b"\n", 1)
    if id_raw is not None:
        w = put(w, b"id: ", 4)
        w = put(w, PyBytes_AS_STRING(id_raw), PyBytes_GET_SIZE(id_raw))
        w = put(w, b"\n", 1)
    if retry_raw is not None:
        w = put(w, b"retry: ", 7)
        w = put(w, PyBytes_AS_STRING(retry_raw), PyBytes_GET_SIZE(retry_raw))
        w = put(w, b"\n", 1)
    w = put(w, b"data: ", 6)
    i = 0
    if lines == 1:
        w = put(w, p, n)
        i = n
    while i < n:
        if p[i] == b'\n' or p[i] == b'\r':
            if p[i] == b'\r' and i + 1 < n and p[i + 1] == b'\n':
                i += 1
            w = put(w, b"\ndata: ", 7)
        else:
            w[0] = p[i]
            w += 1
        i += 1
    w = put(w, b"\n\n", 2)
    assert w == PyBytes_AS_STRING(result) + total
    return result


cdef inline char* put(char* w, const char* s, Py_ssize_t k) noexcept:
    memcpy(w, s, <size_t>k)
    return w + k


def encode_comment(text=""):
    """A comment block, ``: text`` and a blank line (``: ping`` keeps a stream alive).

    Each line of a multi-line text becomes its own comment line, so no text can end the
    comment early and inject a field.
    """
    cdef const char* p
    cdef Py_ssize_t n, i
    cdef bytearray out
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    p = PyUnicode_AsUTF8AndSize(text, &n)
    if memchr(p, b'\r', <size_t>n) == NULL and memchr(p, b'\n', <size_t>n) == NULL:
        return b": " + PyBytes_FromStringAndSize(p, n) + b"\n\n"
    out = bytearray(b": ")
    i = 0
    while i < n:
        if p[i] == b'\n' or p[i] == b'\r':
            if p[i] == b'\r' and i + 1 < n and p[i + 1] == b'\n':
                i += 1
            out += b"\n: "
        else:
            out.append(<unsigned char>p[i])
        i += 1
    out += b"\n\n"
    return bytes(out)
