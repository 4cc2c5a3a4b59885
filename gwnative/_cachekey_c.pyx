# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Cache keys: the compiled twin of ``_cachekey_py``.

Same API, same keys, same exceptions; ``_cachekey_py`` is the reference and documents the
canonical form and the ignored fields.

How this one is fast: JSON bytes are never turned into Python objects.  A small
recursive-descent scanner validates the text as it goes (JSON grammar as ``json.loads``
accepts it, strict UTF-8, no NaN/Infinity) and writes the canonical form straight into a
C buffer:

* strings are copied run by run; escapes are decoded and re-escaped canonically.
* an object's members are written one after another (``"key":value``, no commas) while
  their decoded keys go to a side arena; at ``}`` the members are sorted by key bytes
  (equal keys: the last one wins) and written back in order, with commas.  Ignored
  top-level fields are parsed (so they are validated) and then cut off again.
* integers are copied as written (JSON allows a single spelling, except ``-0``); other
  numbers go through the same string-to-double and double-to-repr routines CPython's
  ``float()`` and ``repr()`` use.

The dict path walks the parsed objects with the C API and writes the same bytes.  The
buffer starts with the namespace header, and one ``blake2b`` call hashes it all.
"""
cimport cython
from cpython.bool cimport PyBool_Check
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.conversion cimport PyOS_double_to_string, PyOS_string_to_double
from cpython.dict cimport PyDict_Check, PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.list cimport PyList_Check, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check, PyLong_FromDouble
from cpython.mem cimport PyMem_Free
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.math cimport floor
from libc.stdlib cimport free, malloc, realloc
from libc.stdint cimport uint32_t
from libc.string cimport memcmp, memcpy, strlen

from hashlib import blake2b as _blake2b

from .errors import CacheKeyError

__all__ = ["IGNORED_FIELDS", "MAX_DEPTH", "VERSION_TAG", "cache_key", "canonical_bytes"]

IGNORED_FIELDS = frozenset(
    {"user", "stream", "stream_options", "metadata", "store", "service_tier"}
)
MAX_DEPTH = 128
VERSION_TAG = b"gwnative.cache_key.v1\x00"

cdef extern from "Python.h":
    int Py_DTSF_ADD_DOT_0
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    # without Cython's "except NULL": the caller checks and clears
    const char* utf8_or_null "PyUnicode_AsUTF8AndSize"(object o, Py_ssize_t* size)
    int PyErr_ExceptionMatches(object exc)
    void PyErr_Clear()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Skip bytes that need no attention, 8 at a time (SWAR, portable C): stop in the
       first 8-byte word holding a quote (0x22), a backslash (0x5c), a byte below 0x20
       or, if stop_high, a byte from 0x80 up.  The caller finishes byte by byte. */
    static inline Py_ssize_t gw_skip_plain(const unsigned char *s, Py_ssize_t i,
                                           Py_ssize_t n, int stop_high) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        const uint64_t high_mask = stop_high ? highs : 0;
        while (i + 8 <= n) {
            uint64_t w, q, b;
            memcpy(&w, s + i, 8);
            q = w ^ (ones * 0x22);
            b = w ^ (ones * 0x5c);
            if ((((q - ones) & ~q) | ((b - ones) & ~b) | ((w - ones * 0x20) & ~w)
                 | (w & high_mask)) & highs)
                break;
            i += 8;
        }
        return i;
    }

    /* memcpy for the many short runs of a JSON text, without a libc call for them. */
    static inline void gw_copy(unsigned char *d, const unsigned char *s, Py_ssize_t k) {
        if (k >= 16) {
            memcpy(d, s, (size_t)k);
        } else if (k >= 8) {
            uint64_t a, b;
            memcpy(&a, s, 8); memcpy(&b, s + k - 8, 8);
            memcpy(d, &a, 8); memcpy(d + k - 8, &b, 8);
        } else if (k >= 4) {
            uint32_t a, b;
            memcpy(&a, s, 4); memcpy(&b, s + k - 4, 4);
            memcpy(d, &a, 4); memcpy(d + k - 4, &b, 4);
        } else if (k > 0) {
            d[0] = s[0]; d[k >> 1] = s[k >> 1]; d[k - 1] = s[k - 1];
        }
    }

    /* The canonical escape of a quote, a backslash or a control character, as
       json.dumps writes it: the short forms JSON has (b f n r t), else u00xx in
       lowercase hex.  At most 6 bytes.  (Character codes in hex: this text is a
       Python string literal, where backslashes would be escapes.) */
    static inline unsigned char *gw_put_escape(unsigned char *o, unsigned char c) {
        static const char hex[] = "0123456789abcdef";
        o[0] = 0x5c;
        switch (c) {
        case 0x22: o[1] = 0x22; return o + 2;
        case 0x5c: o[1] = 0x5c; return o + 2;
        case 0x08: o[1] = 'b'; return o + 2;
        case 0x0c: o[1] = 'f'; return o + 2;
        case 0x0a: o[1] = 'n'; return o + 2;
        case 0x0d: o[1] = 'r'; return o + 2;
        case 0x09: o[1] = 't'; return o + 2;
        default:
            o[1] = 'u'; o[2] = '0'; o[3] = '0';
            o[4] = (unsigned char)hex[c >> 4]; o[5] = (unsigned char)hex[c & 15];
            return o + 6;
        }
    }

    /* One decoded code point: canonically escaped if it must be (canon), else its UTF-8
       (a lone surrogate in its 3-byte form, as encode("utf-8", "surrogatepass")). */
    static inline unsigned char *gw_put_cp(unsigned char *o, uint32_t cp, int canon) {
        if (cp < 0x80) {
            if (canon && (cp < 0x20 || cp == 0x22 || cp == 0x5c))
                return gw_put_escape(o, (unsigned char)cp);
            *o = (unsigned char)cp;
            return o + 1;
        }
        if (cp < 0x800) {
            o[0] = (unsigned char)(0xc0 | (cp >> 6));
            o[1] = (unsigned char)(0x80 | (cp & 0x3f));
            return o + 2;
        }
        if (cp < 0x10000) {
            o[0] = (unsigned char)(0xe0 | (cp >> 12));
            o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
            o[2] = (unsigned char)(0x80 | (cp & 0x3f));
            return o + 3;
        }
        o[0] = (unsigned char)(0xf0 | (cp >> 18));
        o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        o[3] = (unsigned char)(0x80 | (cp & 0x3f));
        return o + 4;
    }

    /* The length of the UTF-8 sequence at s[i] (a byte >= 0x80) if Python's strict
       decoder accepts it (no overlongs, no surrogates, nothing above U+10FFFF), else 0. */
    static inline int gw_utf8_len(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) {
        unsigned char c = s[i], lo = 0x80, hi = 0xbf;
        int k;
        if (c >= 0xc2 && c <= 0xdf) k = 2;
        else if (c >= 0xe0 && c <= 0xef) {
            k = 3;
            if (c == 0xe0) lo = 0xa0; else if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 4;
            if (c == 0xf0) lo = 0x90; else if (c == 0xf4) hi = 0x8f;
        } else return 0;
        if (i + k > n || s[i + 1] < lo || s[i + 1] > hi) return 0;
        if (k >= 3 && (s[i + 2] < 0x80 || s[i + 2] > 0xbf)) return 0;
        if (k == 4 && (s[i + 3] < 0x80 || s[i + 3] > 0xbf)) return 0;
        return k;
    }
    """
    Py_ssize_t gw_skip_plain(const unsigned char* s, Py_ssize_t i, Py_ssize_t n,
                             int stop_high) noexcept nogil
    void gw_copy(unsigned char* d, const unsigned char* s, Py_ssize_t k) noexcept nogil
    unsigned char* gw_put_escape(unsigned char* o, unsigned char c) noexcept nogil
    unsigned char* gw_put_cp(unsigned char* o, uint32_t cp, int canon) noexcept nogil
    int gw_utf8_len(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil

cdef enum:
    C_MAX_DEPTH = 128
    INSERTION_SORT_MAX = 24

cdef double INF = float("inf")

# Byte classes for the string scanner.
cdef enum:
    PLAIN = 0      # copied as is: printable ASCII except '"' and '\\'
    QUOTE = 1
    BACKSLASH = 2
    CONTROL = 3    # U+0000-U+001F: must be escaped in JSON
    HIGH = 4       # start (or stray continuation) of a multi-byte UTF-8 sequence

cdef unsigned char CLASS[256]
cdef int _i
for _i in range(256):
    CLASS[_i] = CONTROL if _i < 0x20 else (HIGH if _i >= 0x80 else PLAIN)
CLASS[ord('"')] = QUOTE
CLASS[ord('\\')] = BACKSLASH

# 1 for the bytes a canonical string escapes: '"', '\\' and U+0000-U+001F.
cdef unsigned char NEEDS_ESC[256]
for _i in range(256):
    NEEDS_ESC[_i] = _i < 0x20 or _i == 0x22 or _i == 0x5c


cdef struct Buf:
    unsigned char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef struct Member:
    const unsigned char* kp  # the decoded key's UTF-8 (set before sorting)
    Py_ssize_t key_off   # bytes path: the decoded key in the key arena
    Py_ssize_t key_len
    PyObject* kobj       # dict path: a strong reference to the owner of kp
    Py_ssize_t start     # bytes path: the member's `"key":value` text in out
    Py_ssize_t end
    Py_ssize_t order     # position in the object, to break ties (last one wins)
    PyObject* val        # dict path: the value (a strong reference)


cdef struct Scan:
    const unsigned char* s   # the JSON text (bytes path)
    Py_ssize_t n
    Py_ssize_t pos
    Buf out                  # the canonical form
    Buf keys                 # decoded keys of the objects being read
    Buf tmp                  # scratch for reordering members
    Member* mem              # members of the objects being read (a stack)
    Py_ssize_t mem_n
    Py_ssize_t mem_cap
    Member* mtmp             # scratch for the merge sort
    Py_ssize_t mtmp_cap
    bint spare               # the buffers are SPARE's, to hand back


cdef int reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.n + extra, cap
    cdef unsigned char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < need:
        cap = need
    if cap < 1024:
        cap = 1024
    p = <unsigned char*>realloc(b.p, <size_t>cap)
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef inline int put(Buf* b, const void* src, Py_ssize_t k) except -1:
    if b.n + k > b.cap:
        reserve(b, k)
    gw_copy(b.p + b.n, <const unsigned char*>src, k)
    b.n += k
    return 0


cdef inline int put1(Buf* b, unsigned char c) except -1:
    if b.n + 1 > b.cap:
        reserve(b, 1)
    b.p[b.n] = c
    b.n += 1
    return 0


cdef int push_member(Scan* sc) except -1:
    cdef Py_ssize_t cap
    cdef Member* m
    if sc.mem_n == sc.mem_cap:
        cap = sc.mem_cap * 2 if sc.mem_cap else 64
        m = <Member*>realloc(sc.mem, <size_t>cap * sizeof(Member))
        if m == NULL:
            raise MemoryError()
        sc.mem = m
        sc.mem_cap = cap
    sc.mem_n += 1
    return 0


cdef void scan_free(Scan* sc) noexcept:
    free(sc.out.p)
    free(sc.keys.p)
    free(sc.tmp.p)
    free(sc.mem)
    free(sc.mtmp)


cdef int fail(Scan* sc, str what) except -1:
    raise CacheKeyError(f"request body is not valid JSON: {what} at byte {sc.pos}")


# -- canonical writers ---------------------------------------------------------------

cdef int put_escaped(Buf* b, const unsigned char* p, Py_ssize_t k) except -1:
    """Write a decoded string's UTF-8 as canonical JSON string content (no quotes)."""
    cdef Py_ssize_t i = 0, run
    cdef unsigned char* o
    # Invariant: the buffer has room for what is written plus the input left, so a
    # plain run needs no check; only an escape (up to 6 bytes for 1) may need more.
    reserve(b, k)
    o = b.p + b.n
    while i < k:
        run = i
        i = gw_skip_plain(p, i, k, 0)
        while i < k and not NEEDS_ESC[p[i]]:
            i += 1
        if i > run:
            gw_copy(o, p + run, i - run)
            o += i - run
        if i < k:
            if (o - b.p) + 6 + (k - i - 1) > b.cap:
                b.n = o - b.p
                reserve(b, 6 + k - i)
                o = b.p + b.n
            o = gw_put_escape(o, p[i])
            i += 1
    b.n = o - b.p
    return 0


cdef int put_llong(Buf* b, long long v) except -1:
    cdef unsigned char d[24]
    cdef int i = 24
    cdef unsigned long long u
    if v < 0:
        u = (<unsigned long long>0) - <unsigned long long>v
    else:
        u = <unsigned long long>v
    while True:
        i -= 1
        d[i] = <unsigned char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        d[i] = b'-'
    return put(b, d + i, 24 - i)


cdef int put_ascii_str(Buf* b, str s) except -1:
    cdef Py_ssize_t k
    cdef const char* p = PyUnicode_AsUTF8AndSize(s, &k)
    return put(b, p, k)


cdef int put_double(Buf* b, double x) except -1:
    """An integral value as the integer, any other finite value as repr(float)."""
    cdef char* r
    if not (-INF < x < INF):
        raise CacheKeyError(f"{x!r} is not a JSON number")
    if x == floor(x):
        if -9223372036854775808.0 <= x < 9223372036854775808.0:
            return put_llong(b, <long long>x)
        return put_ascii_str(b, int.__repr__(PyLong_FromDouble(x)))
    r = PyOS_double_to_string(x, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        put(b, r, <Py_ssize_t>strlen(r))
    finally:
        PyMem_Free(r)
    return 0



# -- sorting members -----------------------------------------------------------------

cdef inline int member_cmp(const Member* a, const Member* b) noexcept:
    cdef Py_ssize_t k = a.key_len if a.key_len < b.key_len else b.key_len, i
    cdef const unsigned char* x = a.kp
    cdef const unsigned char* y = b.kp
    cdef int c
    if k <= 16:  # the usual short key: no call
        for i in range(k):
            if x[i] != y[i]:
                return -1 if x[i] < y[i] else 1
    else:
        c = memcmp(x, y, <size_t>k)
        if c:
            return c
    if a.key_len != b.key_len:
        return -1 if a.key_len < b.key_len else 1
    return -1 if a.order < b.order else (1 if a.order > b.order else 0)


cdef int sort_members(Scan* sc, Py_ssize_t lo, Py_ssize_t hi) except -1:
    """Sort mem[lo:hi] by (key bytes, order): insertion sort, or a merge sort."""
    cdef Member* m = sc.mem + lo
    cdef Py_ssize_t k = hi - lo, i, j, width, a, mid, end, x, y, o
    cdef Member t
    cdef Member* src
    cdef Member* dst
    cdef Member* sw
    if k <= INSERTION_SORT_MAX:
        for i in range(1, k):
            t = m[i]
            j = i - 1
            while j >= 0 and member_cmp(&m[j], &t) > 0:
                m[j + 1] = m[j]
                j -= 1
            m[j + 1] = t
        return 0
    if sc.mtmp_cap < k:
        free(sc.mtmp)
        sc.mtmp = <Member*>malloc(<size_t>k * sizeof(Member))
        if sc.mtmp == NULL:
            sc.mtmp_cap = 0
            raise MemoryError()
        sc.mtmp_cap = k
    src = m
    dst = sc.mtmp
    width = 1
    while width < k:
        a = 0
        while a < k:
            mid = a + width if a + width < k else k
            end = a + 2 * width if a + 2 * width < k else k
            x = a
            y = mid
            o = a
            while x < mid and y < end:
                if member_cmp(&src[y], &src[x]) < 0:
                    dst[o] = src[y]
                    y += 1
                else:
                    dst[o] = src[x]
                    x += 1
                o += 1
            while x < mid:
                dst[o] = src[x]
                x += 1
                o += 1
            while y < end:
                dst[o] = src[y]
                y += 1
                o += 1
            a = end
        sw = src
        src = dst
        dst = sw
        width *= 2
    if src != m:
        memcpy(m, src, <size_t>k * sizeof(Member))
    return 0


cdef inline bint same_key(const Member* a, const Member* b) noexcept:
    return a.key_len == b.key_len and memcmp(a.kp, b.kp, <size_t>a.key_len) == 0


cdef bint is_ignored(const unsigned char* k, Py_ssize_t n) noexcept:
    if n == 4:
        return memcmp(k, b"user", 4) == 0
    if n == 5:
        return memcmp(k, b"store", 5) == 0
    if n == 6:
        return memcmp(k, b"stream", 6) == 0
    if n == 8:
        return memcmp(k, b"metadata", 8) == 0
    if n == 12:
        return memcmp(k, b"service_tier", 12) == 0
    if n == 14:
        return memcmp(k, b"stream_options", 14) == 0
    return False


# -- the bytes path: scan JSON text --------------------------------------------------

cdef inline void skip_ws(Scan* sc) noexcept:
    cdef const unsigned char* s = sc.s
    cdef Py_ssize_t i = sc.pos, n = sc.n
    while i < n and (s[i] == b' ' or s[i] == b'\n' or s[i] == b'\r' or s[i] == b'\t'):
        i += 1
    sc.pos = i


cdef int hex4(Scan* sc, Py_ssize_t at, uint32_t* out) except -1:
    cdef uint32_t v = 0
    cdef unsigned char c
    cdef Py_ssize_t i
    if at + 4 > sc.n:
        sc.pos = at
        return fail(sc, "truncated \\u escape")
    for i in range(at, at + 4):
        c = sc.s[i]
        if b'0' <= c <= b'9':
            v = (v << 4) | (c - 48)
        elif b'a' <= c <= b'f':
            v = (v << 4) | (c - 87)
        elif b'A' <= c <= b'F':
            v = (v << 4) | (c - 55)
        else:
            sc.pos = i
            return fail(sc, "invalid \\uXXXX escape")
    out[0] = v
    return 0


cdef int scan_string(Scan* sc, Buf* dst, bint canon) except -1:
    """Read the string at sc.pos (on its '"'); write it decoded to dst, canonically
    quoted and escaped when ``canon``, else as raw UTF-8 (for keys).  Returns 1 if the
    text had an escape, else 0: then the raw text is already canonical (raw '"', '\\'
    and control characters cannot occur in a JSON string)."""
    cdef const unsigned char* s = sc.s
    cdef Py_ssize_t n = sc.n, i = sc.pos + 1, run
    cdef unsigned char c, cls
    cdef unsigned char* o
    cdef uint32_t cp, cp2
    cdef int k, escaped = 0
    # No string is longer decoded (or canonically escaped, quotes included) than it is
    # spelled in JSON, so room for the rest of the input is room enough.
    reserve(dst, n - sc.pos + 2)
    o = dst.p + dst.n
    if canon:
        o[0] = b'"'
        o += 1
    while True:
        run = i
        i = gw_skip_plain(s, i, n, 1)
        while i < n and CLASS[s[i]] == PLAIN:
            i += 1
        if i > run:
            gw_copy(o, s + run, i - run)
            o += i - run
        if i >= n:
            sc.pos = i
            return fail(sc, "unterminated string")
        c = s[i]
        cls = CLASS[c]
        if cls == QUOTE:
            i += 1
            break
        if cls == HIGH:
            k = gw_utf8_len(s, i, n)
            if k == 0:
                sc.pos = i
                return fail(sc, "invalid UTF-8")
            gw_copy(o, s + i, k)
            o += k
            i += k
            continue
        if cls == CONTROL:
            sc.pos = i
            return fail(sc, "control character in string")
        # a backslash escape
        escaped = 1
        if i + 1 >= n:
            sc.pos = i
            return fail(sc, "unterminated string")
        c = s[i + 1]
        if c == b'u':
            hex4(sc, i + 2, &cp)
            i += 6
            # A high surrogate escape directly followed by a low one is one character
            # (json.loads joins them); otherwise each stays a lone surrogate.
            if 0xd800 <= cp <= 0xdbff and i + 1 < n and s[i] == b'\\' and s[i + 1] == b'u':
                hex4(sc, i + 2, &cp2)
                if 0xdc00 <= cp2 <= 0xdfff:
                    cp = 0x10000 + (((cp - 0xd800) << 10) | (cp2 - 0xdc00))
                    i += 6
            o = gw_put_cp(o, cp, canon)
            continue
        if c == b'"':
            cp = 0x22
        elif c == b'\\':
            cp = 0x5c
        elif c == b'/':
            cp = 0x2f
        elif c == b'b':
            cp = 0x08
        elif c == b'f':
            cp = 0x0c
        elif c == b'n':
            cp = 0x0a
        elif c == b'r':
            cp = 0x0d
        elif c == b't':
            cp = 0x09
        else:
            sc.pos = i
            return fail(sc, "invalid escape")
        o = gw_put_cp(o, cp, canon)
        i += 2
    if canon:
        o[0] = b'"'
        o += 1
    dst.n = o - dst.p
    sc.pos = i
    return escaped


cdef int scan_number(Scan* sc) except -1:
    cdef const unsigned char* s = sc.s
    cdef Py_ssize_t n = sc.n, start = sc.pos, i = sc.pos
    cdef bint is_float = False
    cdef char small[64]
    cdef char* text
    cdef double x
    if s[i] == b'-':
        i += 1
    if i < n and s[i] == b'0':
        i += 1
    elif i < n and b'1' <= s[i] <= b'9':
        i += 1
        while i < n and b'0' <= s[i] <= b'9':
            i += 1
    else:
        sc.pos = i
        return fail(sc, "invalid number")
    if i < n and s[i] == b'.':
        i += 1
        if not (i < n and b'0' <= s[i] <= b'9'):
            sc.pos = i
            return fail(sc, "invalid number")
        while i < n and b'0' <= s[i] <= b'9':
            i += 1
        is_float = True
    if i < n and (s[i] == b'e' or s[i] == b'E'):
        i += 1
        if i < n and (s[i] == b'+' or s[i] == b'-'):
            i += 1
        if not (i < n and b'0' <= s[i] <= b'9'):
            sc.pos = i
            return fail(sc, "invalid number")
        while i < n and b'0' <= s[i] <= b'9':
            i += 1
        is_float = True
    sc.pos = i
    if not is_float:
        if i - start == 2 and s[start] == b'-' and s[start + 1] == b'0':
            return put1(&sc.out, b'0')
        return put(&sc.out, s + start, i - start)
    # The same correctly rounded conversion float() uses.
    if i - start < 64:
        text = small
    else:
        text = <char*>malloc(<size_t>(i - start + 1))
        if text == NULL:
            raise MemoryError()
    try:
        memcpy(text, s + start, <size_t>(i - start))
        text[i - start] = 0
        x = PyOS_string_to_double(text, NULL, NULL)  # overflow gives +-inf, refused below
    finally:
        if text != small:
            free(text)
    return put_double(&sc.out, x)


cdef int scan_literal(Scan* sc, const char* word, Py_ssize_t k) except -1:
    if sc.pos + k > sc.n or memcmp(sc.s + sc.pos, word, <size_t>k) != 0:
        return fail(sc, "expecting a value")
    put(&sc.out, word, k)
    sc.pos += k
    return 0


cdef int scan_value(Scan* sc, int depth) except -1:
    """Read the value at sc.pos (after whitespace), inside a container at ``depth``."""
    cdef unsigned char c
    if sc.pos >= sc.n:
        return fail(sc, "expecting a value")
    c = sc.s[sc.pos]
    if c == b'"':
        return scan_string(sc, &sc.out, True)
    if c == b'{':
        return scan_object(sc, depth + 1, False)
    if c == b'[':
        return scan_array(sc, depth + 1)
    if c == b'-' or (b'0' <= c <= b'9'):
        return scan_number(sc)
    if c == b't':
        return scan_literal(sc, b"true", 4)
    if c == b'f':
        return scan_literal(sc, b"false", 5)
    if c == b'n':
        return scan_literal(sc, b"null", 4)
    return fail(sc, "expecting a value")


cdef int too_deep() except -1:
    raise CacheKeyError(f"nesting deeper than {C_MAX_DEPTH}")


cdef int scan_array(Scan* sc, int depth) except -1:
    if depth > C_MAX_DEPTH:
        return too_deep()
    sc.pos += 1
    put1(&sc.out, b'[')
    skip_ws(sc)
    if sc.pos < sc.n and sc.s[sc.pos] == b']':
        sc.pos += 1
        return put1(&sc.out, b']')
    while True:
        skip_ws(sc)
        scan_value(sc, depth)
        skip_ws(sc)
        if sc.pos >= sc.n:
            return fail(sc, "unterminated array")
        if sc.s[sc.pos] == b',':
            sc.pos += 1
            put1(&sc.out, b',')
        elif sc.s[sc.pos] == b']':
            sc.pos += 1
            return put1(&sc.out, b']')
        else:
            return fail(sc, "expecting ',' or ']'")


cdef int scan_object(Scan* sc, int depth, bint top) except -1:
    cdef Py_ssize_t base = sc.mem_n, keys_base = sc.keys.n
    cdef Py_ssize_t content, key_off, key_len, start, order = 0
    cdef Member* m
    cdef int escaped
    if depth > C_MAX_DEPTH:
        return too_deep()
    sc.pos += 1
    put1(&sc.out, b'{')
    content = sc.out.n
    skip_ws(sc)
    if sc.pos < sc.n and sc.s[sc.pos] == b'}':
        sc.pos += 1
        return put1(&sc.out, b'}')
    while True:
        skip_ws(sc)
        if sc.pos >= sc.n or sc.s[sc.pos] != b'"':
            return fail(sc, "expecting a property name in double quotes")
        key_off = sc.keys.n
        escaped = scan_string(sc, &sc.keys, False)
        key_len = sc.keys.n - key_off
        skip_ws(sc)
        if sc.pos >= sc.n or sc.s[sc.pos] != b':':
            return fail(sc, "expecting ':'")
        sc.pos += 1
        skip_ws(sc)
        start = sc.out.n
        reserve(&sc.out, key_len + 3)
        put1(&sc.out, b'"')
        if escaped:
            put_escaped(&sc.out, sc.keys.p + key_off, key_len)
        else:
            put(&sc.out, sc.keys.p + key_off, key_len)
        put(&sc.out, b'":', 2)
        scan_value(sc, depth)
        if top and is_ignored(sc.keys.p + key_off, key_len):
            sc.out.n = start  # validated, does not count
            sc.keys.n = key_off
        else:
            push_member(sc)
            m = &sc.mem[sc.mem_n - 1]
            m.key_off = key_off
            m.key_len = key_len
            m.start = start
            m.end = sc.out.n
            m.order = order
            m.val = NULL
            m.kobj = NULL
            order += 1
        skip_ws(sc)
        if sc.pos >= sc.n:
            return fail(sc, "unterminated object")
        if sc.s[sc.pos] == b',':
            sc.pos += 1
        elif sc.s[sc.pos] == b'}':
            sc.pos += 1
            break
        else:
            return fail(sc, "expecting ',' or '}'")
    reorder(sc, base, content)
    put1(&sc.out, b'}')
    sc.mem_n = base
    sc.keys.n = keys_base
    return 0


cdef int reorder(Scan* sc, Py_ssize_t base, Py_ssize_t content) except -1:
    """Rewrite out[content:] as the members mem[base:], sorted, deduplicated, with commas."""
    cdef Py_ssize_t k = sc.mem_n - base, i, total, w
    cdef Member* m
    cdef bint first = True
    if k == 0:
        return 0
    m = sc.mem + base
    for i in range(k):
        m[i].kp = sc.keys.p + m[i].key_off
    sort_members(sc, base, sc.mem_n)
    total = sc.out.n - content
    sc.tmp.n = 0
    put(&sc.tmp, sc.out.p + content, total)
    sc.out.n = content
    reserve(&sc.out, total + k)
    m = sc.mem + base
    for i in range(k):
        if i + 1 < k and same_key(&m[i], &m[i + 1]):
            continue  # a repeated key: the last one wins
        if not first:
            sc.out.p[sc.out.n] = b','
            sc.out.n += 1
        first = False
        w = m[i].end - m[i].start
        memcpy(sc.out.p + sc.out.n, sc.tmp.p + (m[i].start - content), <size_t>w)
        sc.out.n += w
    return 0


# -- the dict path: walk parsed objects ----------------------------------------------

cdef const unsigned char* str_utf8(object s, Py_ssize_t* k) except? NULL:
    """The UTF-8 of a str (or subclass), without a copy; NULL (no exception set) when it
    holds lone surrogates, which UTF-8 proper cannot encode."""
    cdef const char* p
    if PyUnicode_IS_ASCII(s):
        k[0] = PyUnicode_GET_LENGTH(s)
        return <const unsigned char*>PyUnicode_DATA(s)
    p = utf8_or_null(s, k)
    if p == NULL and PyErr_ExceptionMatches(UnicodeEncodeError):
        PyErr_Clear()  # else (MemoryError) the exception propagates
    return <const unsigned char*>p


cdef int put_str_obj(Buf* b, object s) except -1:
    """A str (or subclass) as a canonical JSON string."""
    cdef Py_ssize_t k
    cdef const unsigned char* p = str_utf8(s, &k)
    cdef bytes raw
    if p == NULL:  # lone surrogates: their 3-byte form
        raw = str.encode(s, "utf-8", "surrogatepass")
        p = <const unsigned char*>PyBytes_AS_STRING(raw)
        k = PyBytes_GET_SIZE(raw)
    put1(b, b'"')
    put_escaped(b, p, k)
    return put1(b, b'"')


cdef int walk_value(Scan* sc, object v, int depth) except -1:
    cdef long long ll
    cdef int overflow = 0
    if PyUnicode_Check(v):
        return put_str_obj(&sc.out, v)
    if PyDict_Check(v):
        return walk_dict(sc, v, depth + 1, False)
    if PyList_Check(v):
        return walk_list(sc, v, depth + 1)
    if PyBool_Check(v):
        if v is True:
            return put(&sc.out, b"true", 4)
        return put(&sc.out, b"false", 5)
    if PyLong_Check(v):
        ll = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow == 0:
            return put_llong(&sc.out, ll)
        try:
            return put_ascii_str(&sc.out, int.__repr__(v))
        except ValueError as exc:  # beyond sys.get_int_max_str_digits()
            raise CacheKeyError(f"request has no canonical form: {exc}") from exc
    if PyFloat_Check(v):
        return put_double(&sc.out, PyFloat_AS_DOUBLE(v))
    if v is None:
        return put(&sc.out, b"null", 4)
    raise CacheKeyError(f"{type(v).__name__} is not a JSON value")


cdef int walk_list(Scan* sc, object a, int depth) except -1:
    cdef Py_ssize_t i = 0
    cdef object item
    if depth > C_MAX_DEPTH:
        return too_deep()
    put1(&sc.out, b'[')
    while i < PyList_GET_SIZE(a):
        if i:
            put1(&sc.out, b',')
        item = <object>PyList_GET_ITEM(a, i)  # a strong reference while we walk it
        walk_value(sc, item, depth)
        i += 1
    return put1(&sc.out, b']')


cdef int walk_dict(Scan* sc, object d, int depth, bint top) except -1:
    cdef Py_ssize_t base = sc.mem_n, pos = 0, i, k
    cdef PyObject* key
    cdef PyObject* val
    cdef Member* m
    cdef const unsigned char* p
    cdef object owner
    cdef bint first = True
    if depth > C_MAX_DEPTH:
        return too_deep()
    try:
        while PyDict_Next(d, &pos, &key, &val):
            if not PyUnicode_Check(<object>key):
                raise CacheKeyError(
                    f"object keys must be str, not {type(<object>key).__name__}")
            owner = <object>key
            p = str_utf8(owner, &k)
            if p == NULL:  # lone surrogates: their 3-byte form
                owner = str.encode(<object>key, "utf-8", "surrogatepass")
                p = <const unsigned char*>PyBytes_AS_STRING(owner)
                k = PyBytes_GET_SIZE(owner)
            push_member(sc)
            m = &sc.mem[sc.mem_n - 1]
            m.kp = p
            m.key_len = k
            m.order = sc.mem_n - 1 - base
            # Strong references: nothing we call runs Python code, but a finalizer run
            # by the garbage collector could, and must not free what we point to.
            Py_INCREF(owner)
            m.kobj = <PyObject*>owner
            Py_INCREF(<object>val)
            m.val = val
        sort_members(sc, base, sc.mem_n)
        put1(&sc.out, b'{')
        for i in range(base, sc.mem_n):
            m = &sc.mem[i]
            if top and is_ignored(m.kp, m.key_len):
                k = sc.out.n
                walk_value(sc, <object>m.val, depth)  # validated, does not count
                sc.out.n = k
                continue
            if not first:
                put1(&sc.out, b',')
            first = False
            put1(&sc.out, b'"')
            put_escaped(&sc.out, m.kp, m.key_len)
            put(&sc.out, b'":', 2)
            walk_value(sc, <object>m.val, depth)
        put1(&sc.out, b'}')
    finally:
        for i in range(base, sc.mem_n):
            Py_XDECREF(sc.mem[i].kobj)
            Py_XDECREF(sc.mem[i].val)
        sc.mem_n = base
    return 0


# -- entry points --------------------------------------------------------------------

cdef int canonicalize(Scan* sc, object body) except -1:
    """Append the canonical form of ``body`` to sc.out."""
    cdef bytes raw
    if PyBytes_CheckExact(body) or isinstance(body, (bytes, bytearray, memoryview)):
        raw = body if PyBytes_CheckExact(body) else bytes(body)
        sc.s = <const unsigned char*>PyBytes_AS_STRING(raw)
        sc.n = PyBytes_GET_SIZE(raw)
        try:
            return scan_top(sc)
        finally:
            sc.s = NULL  # raw is about to go
    if not PyDict_Check(body):
        raise CacheKeyError(f"a request must be a JSON object, not {type(body).__name__}")
    return walk_dict(sc, body, 1, True)


cdef int scan_top(Scan* sc) except -1:
    sc.pos = 0
    skip_ws(sc)
    if sc.pos >= sc.n:
        return fail(sc, "expecting a value")
    if sc.s[sc.pos] != b'{':
        # Say "not JSON" for what json.loads would refuse, else "not an object".
        scan_value(sc, 0)
        skip_ws(sc)
        if sc.pos != sc.n:
            return fail(sc, "extra data")
        raise CacheKeyError("a request must be a JSON object")
    scan_object(sc, 1, True)
    skip_ws(sc)
    if sc.pos != sc.n:
        return fail(sc, "extra data")
    return 0


# One set of buffers kept between calls (mallocs cost as much as scanning a small
# request).  A nested call (a finalizer run by the garbage collector during a call, say)
# finds it busy and allocates its own.
cdef Scan SPARE
cdef bint SPARE_BUSY = False
cdef Py_ssize_t KEEP_BYTES = 1 << 20  # buffers grown beyond this are freed after use


cdef int scan_open(Scan* sc, Py_ssize_t hint) except -1:
    global SPARE_BUSY
    if SPARE_BUSY:
        memset_scan(sc)
    else:
        sc[0] = SPARE
        SPARE_BUSY = True
        sc.spare = True
    sc.pos = 0
    sc.out.n = sc.keys.n = sc.tmp.n = 0
    sc.mem_n = 0
    reserve(&sc.out, hint)
    return 0


cdef void scan_close(Scan* sc) noexcept:
    global SPARE, SPARE_BUSY
    if not sc.spare:
        scan_free(sc)
        return
    if (sc.out.cap > KEEP_BYTES or sc.keys.cap > KEEP_BYTES or sc.tmp.cap > KEEP_BYTES
            or sc.mem_cap > 4096 or sc.mtmp_cap > 4096):
        scan_free(sc)
        memset_scan(sc)
    sc.s = NULL
    SPARE = sc[0]
    SPARE_BUSY = False


cdef Py_ssize_t size_hint(object body) noexcept:
    if PyBytes_CheckExact(body):
        return PyBytes_GET_SIZE(body) + 64
    return 2048


def canonical_bytes(body):
    """The canonical form of a request (see ``_cachekey_py``), before hashing.

    ``body`` is the raw JSON request (bytes-like) or the already parsed object.
    """
    cdef Scan sc
    scan_open(&sc, size_hint(body))
    try:
        canonicalize(&sc, body)
        return PyBytes_FromStringAndSize(<char*>sc.out.p, sc.out.n)
    finally:
        scan_close(&sc)


def cache_key(body, namespace=""):
    """The cache key of a request: 32 lowercase hex chars (BLAKE2b, 128 bits).

    ``body`` is the raw JSON request (bytes-like) or the parsed object; both forms of the
    same content give the same key.  ``namespace`` separates caches (tenant, deployment).
    Raises ``CacheKeyError`` when the body has no canonical form.
    """
    cdef Scan sc
    cdef Py_ssize_t k
    cdef const char* p
    cdef bytes raw
    cdef unsigned char lenbuf[8]
    cdef int i
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    try:
        p = PyUnicode_AsUTF8AndSize(namespace, &k)
    except UnicodeEncodeError:
        raw = str.encode(namespace, "utf-8", "surrogatepass")
        p = PyBytes_AS_STRING(raw)
        k = PyBytes_GET_SIZE(raw)
    scan_open(&sc, size_hint(body) + 32 + k)
    try:
        put(&sc.out, PyBytes_AS_STRING(VERSION_TAG), PyBytes_GET_SIZE(VERSION_TAG))
        for i in range(8):
            lenbuf[i] = <unsigned char>((<unsigned long long>k) >> (56 - 8 * i))
        put(&sc.out, lenbuf, 8)
        put(&sc.out, p, k)
        canonicalize(&sc, body)
        return _blake2b(
            PyBytes_FromStringAndSize(<char*>sc.out.p, sc.out.n), digest_size=16
        ).hexdigest()
    finally:
        scan_close(&sc)


cdef inline void memset_scan(Scan* sc) noexcept:
    sc.s = NULL
    sc.n = sc.pos = 0
    sc.out.p = NULL
    sc.out.n = sc.out.cap = 0
    sc.keys.p = NULL
    sc.keys.n = sc.keys.cap = 0
    sc.tmp.p = NULL
    sc.tmp.n = sc.tmp.cap = 0
    sc.mem = NULL
    sc.mem_n = sc.mem_cap = 0
    sc.mtmp = NULL
    sc.mtmp_cap = 0
    sc.spare = False
