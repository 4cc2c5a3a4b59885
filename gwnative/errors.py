"""Exceptions raised by the gwnative modules, by the compiled and the pure twin alike.

Both derive from ``ValueError``: each one means "this input is not acceptable", and a
caller that only knows ``ValueError`` still handles them.  The gateway translates them at
its boundary (an upstream that breaks SSE framing, a request body that is not JSON).
"""
from __future__ import annotations


class NativeError(ValueError):
    """Base class of every error raised by gwnative on bad input."""


class SSEError(NativeError):
    """A server-sent event stream broke a limit or was fed after ``close()``.

    Raised by ``SSEParser.feed`` when one pending event block (or one line) grows beyond
    ``max_event_bytes``, and on any ``feed`` after ``close()`` or after an earlier
    ``SSEError``: the parser is finished and keeps no buffered bytes.
    """


class CacheKeyError(NativeError):
    """A request body has no canonical identity.

    Raised by ``cache_key`` for invalid JSON or invalid UTF-8, a top level that is not
    an object, NaN or Infinity, a non-str object key, a value of a type JSON does not
    have, or nesting deeper than 128 containers.
    """
