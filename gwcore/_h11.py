"""The h11 the server and the native transport use: ``h11_mypyc`` (the same API,
compiled with mypyc) when it is installed, else ``h11``.

``GWCORE_H11=h11`` forces the pure one.  Both sides of the gateway must use the same
module: their events and exceptions are different classes.
"""
from __future__ import annotations

import os
import re
from types import ModuleType


def _pick() -> ModuleType:
    if os.environ.get("GWCORE_H11", "") != "h11":
        try:
            import h11_mypyc
            return h11_mypyc
        except ImportError:
            pass
    import h11 as pure
    return pure


h11 = _pick()
NAME = h11.__name__


# -- heads with many fields ---------------------------------------------------------
# h11 checks every field of a head it sends against its grammar, with two regular
# expressions per field, and a chunked response's fields twice more (it rebuilds the
# list to set Transfer-Encoding).  A gateway's answer carries a dozen fields of its own
# making, so that was a good part of the cost of a response.  h11 only needs the fields
# that frame the message or end the connection to keep its state; the others are
# checked here, in one pass over the block, and written after h11's.

FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# In "name: value\r\n" lines: a control character other than HTAB (CR and LF are
# counted apart), or a value with white space at either end (RFC 9110 §5.5, as h11
# checks it).  Checked with C-speed bytes methods: a regular expression with these
# alternatives scanned a dozen lines in 3.5 us, these in 0.7 us.
_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\r\n") + b"\x7f"


def _bad_block(block: bytes, lines: int) -> bool:
    """True when ``lines`` "name: value\\r\\n" lines joined in ``block`` hold a value
    h11 would refuse."""
    return (len(block.translate(None, _CONTROLS)) != len(block)
            or block.count(b"\n") != lines or block.count(b"\r") != lines
            or b":  " in block or b": \t" in block or b" \r\n" in block or b"\t\r\n" in block)


# name -> True when h11 must see it (framing), False for the others; checked once each.
_names: dict[bytes, bool] = {}


def _learn(headers: list[tuple[bytes, bytes]]) -> None:
    """Check the names of ``headers`` not seen before and remember them: afterwards all
    of them are known (at most 4096 names: the cache is emptied when they would not fit)."""
    if len(_names) + len(headers) > 4096:
        _names.clear()
    for name, _ in headers:
        if name not in _names:
            if not _TOKEN.fullmatch(name):
                raise h11.LocalProtocolError(f"Illegal header name {name!r}")
            _names[name] = name.lower() in FRAMING


def split_fields(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(the fields h11 must see, the other fields as "name: value\\r\\n" lines).

    Raises h11.LocalProtocolError, as h11 would, for a name that is not a token or a
    value h11 would refuse.  (Comprehensions and subscripts rather than a loop of
    ``get`` and ``append`` calls: this runs for every response and upstream request.)"""
    names = _names
    for name, _ in headers:
        if name not in names:
            _learn(headers)
            break
    framing = [field for field in headers if names[field[0]]]
    # An empty value is written "name:" (h11 allows it; "name: " would read as a
    # value with white space at its end).
    lines = [b"%s: %s\r\n" % field if field[1] else b"%s:\r\n" % field[0]
             for field in headers if not names[field[0]]]
    block = b"".join(lines)
    if block and _bad_block(block, len(lines)):
        raise h11.LocalProtocolError("Illegal header value")
    return framing, block


def with_fields(head: bytes, block: bytes) -> bytes:
    """A head h11 framed ("...\\r\\n\\r\\n") with ``block``'s lines added at its end."""
    return head[:-2] + block + b"\r\n" if block else head
