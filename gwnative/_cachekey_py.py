"""Cache keys: the canonical identity of an LLM request (pure-Python twin, the reference).

``cache_key(body, namespace)`` is a 128-bit BLAKE2b digest (32 lowercase hex chars) of
the request's canonical form.  Two requests get the same key exactly when they ask the
same question: same fields with the same values, whatever the key order, whitespace,
string escaping or number spelling, and whatever the fields that do not change the answer.

Fields that do not count (``IGNORED_FIELDS``, top level only)
-------------------------------------------------------------
It is a deny-list on purpose: a field the gateway does not know (a new sampling
parameter, say) counts, so a field added to the API can cost a cache hit but can never
cause a false one.  Each ignored field is known not to change the generated answer:

``user``
    OpenAI's end-user id for abuse monitoring; tags the request, does not steer it.
    (Per-tenant isolation is the namespace's job, not this field's.)
``stream``
    Transport only: the same answer, as one JSON body or as SSE.  The gateway replays a
    cached answer either way.
``stream_options``
    Transport only (``include_usage``: whether a usage chunk ends the stream).
``metadata``
    The caller's own tags (OpenAI stored completions, Anthropic ``metadata.user_id``);
    not seen by the model.
``store``
    Whether OpenAI keeps the completion for evals/distillation; no effect on the answer.
``service_tier``
    Which capacity pool serves the request (latency and price), not what it generates.

The same names nested deeper (``messages[0]["user"]``, a tool schema's ``metadata``
property) are content and count.  Ignored fields must still be valid JSON.

Canonical form (exact bytes; the compiled twin produces the same)
-----------------------------------------------------------------
::

    digest = blake2b(VERSION_TAG + len(ns).to_bytes(8, "big") + ns + canonical(body),
                     digest_size=16)
    ns     = namespace.encode("utf-8", "surrogatepass")

The namespace comes first with its length, so no (namespace, body) pair can produce the
bytes of another by concatenation.  ``canonical`` writes compact JSON:

* object: ``{"k":v,...}``, members sorted by key, keys compared by code point (equal to
  comparing their UTF-8 bytes); at the top level the ignored fields are left out.
  In JSON text a repeated key keeps its last value, as ``json.loads`` does.
* array: ``[v,...]`` in order.
* string: ``"..."``, escaping ``"`` ``\\`` and U+0000-U+001F exactly as ``json.dumps``
  with ``ensure_ascii=False`` does (``\\n``, ``\\u001f``...); every other code point is
  its UTF-8 (a lone surrogate, possible through a ``\\ud800`` escape, is its 3-byte form).
  So ``"\\u00e9"`` and ``"é"`` are the same string.
* integer: decimal digits (``-`` if negative, never ``-0``).  A float with an integral
  value is that integer (``1.0`` is ``1``, ``-0.0`` is ``0``, ``1e2`` is ``100``).
* other float: ``repr(float)``, the shortest text that reads back to the same double.
  NaN and Infinity (and a literal like ``1e400`` that overflows to it) are rejected.
* ``true``, ``false``, ``null``.

Errors (``CacheKeyError``, a ValueError): invalid UTF-8 or JSON, a top level that is not
an object, a non-str object key or a non-JSON value in a dict, NaN/Infinity, and nesting
deeper than ``MAX_DEPTH`` (128) containers, the top-level object being depth 1 (stack
safety against hostile input).

How this twin works: ``json`` parses the bytes (integers kept as their literal text, so
no integer is too long to handle), then a recursive walk writes the canonical text,
which is encoded once and hashed.
"""
from __future__ import annotations

import json
import json.encoder
from hashlib import blake2b
from operator import itemgetter
from typing import Any

from .errors import CacheKeyError

__all__ = ["IGNORED_FIELDS", "MAX_DEPTH", "VERSION_TAG", "cache_key", "canonical_bytes"]

IGNORED_FIELDS: frozenset[str] = frozenset(
    {"user", "stream", "stream_options", "metadata", "store", "service_tier"}
)

# 128: far deeper than any real request (tool schemas nest a few levels), shallow enough
# for a recursive walk to stay well inside the interpreter's recursion limit.
MAX_DEPTH = 128

# Changing the canonical form changes every key; bump the tag with it.
VERSION_TAG = b"gwnative.cache_key.v1\x00"

_INF = float("inf")
_encode_str = json.encoder.encode_basestring  # escapes '"', '\\' and U+0000-U+001F only
_first = itemgetter(0)


class _IntLiteral(str):
    """A JSON integer as written.  JSON allows no '+' and no leading zeros, so the text is
    already canonical, except "-0"; keeping the text avoids int(), whose digit limit
    (sys.get_int_max_str_digits) would reject long integers."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise CacheKeyError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_int=_IntLiteral, parse_constant=_reject_constant)


def _float(x: float) -> str:
    if float.is_integer(x):
        return int.__repr__(int(x))
    if not -_INF < x < _INF:
        raise CacheKeyError(f"{x!r} is not a JSON number")
    return float.__repr__(x)


def _plain_key(k: object) -> str:
    if isinstance(k, str):
        return str.__str__(k)
    raise CacheKeyError(f"object keys must be str, not {type(k).__name__}")


def _value(v: Any, out: list[str], depth: int) -> None:
    """Append the canonical text of ``v``, a value inside a container at ``depth``."""
    t = type(v)
    if t is str:
        out.append(_encode_str(v))
    elif t is dict:
        _object(v, out, depth + 1, False)
    elif t is list:
        _array(v, out, depth + 1)
    elif t is _IntLiteral:
        out.append("0" if v == "-0" else str.__str__(v))
    elif t is int:
        out.append(int.__repr__(v))
    elif t is float:
        out.append(_float(v))
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    elif isinstance(v, str):  # subclasses: by value
        out.append(_encode_str(str.__str__(v)))
    elif isinstance(v, dict):
        _object(v, out, depth + 1, False)
    elif isinstance(v, list):
        _array(v, out, depth + 1)
    elif isinstance(v, int):
        out.append(int.__repr__(v))
    elif isinstance(v, float):
        out.append(_float(float.__float__(v)))  # the value, not an overridden __int__
    else:
        raise CacheKeyError(f"{type(v).__name__} is not a JSON value")


def _array(a: list[Any], out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CacheKeyError(f"nesting deeper than {MAX_DEPTH}")
    out.append("[")
    first = True
    for v in list.__iter__(a):
        if first:
            first = False
        else:
            out.append(",")
        _value(v, out, depth)
    out.append("]")


def _object(d: dict[str, Any], out: list[str], depth: int, top: bool) -> None:
    if depth > MAX_DEPTH:
        raise CacheKeyError(f"nesting deeper than {MAX_DEPTH}")
    items = [(k if type(k) is str else _plain_key(k), v) for k, v in dict.items(d)]
    items.sort(key=_first)
    out.append("{")
    first = True
    for k, v in items:
        if top and k in IGNORED_FIELDS:
            _value(v, [], depth)  # must be valid, does not count
            continue
        if first:
            first = False
        else:
            out.append(",")
        out.append(_encode_str(k))
        out.append(":")
        _value(v, out, depth)
    out.append("}")


def canonical_bytes(body: bytes | dict[str, Any]) -> bytes:
    """The canonical form of a request (see the module docstring), before hashing.

    ``body`` is the raw JSON request (bytes-like) or the already parsed object.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CacheKeyError(f"request body is not UTF-8: {exc}") from exc
        try:
            obj = _DECODER.decode(text)
        except CacheKeyError:
            raise
        except (ValueError, RecursionError) as exc:
            raise CacheKeyError(f"request body is not JSON: {exc}") from exc
    else:
        obj = body
    if not isinstance(obj, dict):
        raise CacheKeyError(f"a request must be a JSON object, not {type(obj).__name__}")
    out: list[str] = []
    try:
        _object(obj, out, 1, True)
    except CacheKeyError:
        raise
    except ValueError as exc:  # int.__repr__ beyond sys.get_int_max_str_digits()
        raise CacheKeyError(f"request has no canonical form: {exc}") from exc
    return "".join(out).encode("utf-8", "surrogatepass")


def cache_key(body: bytes | dict[str, Any], namespace: str = "") -> str:
    """The cache key of a request: 32 lowercase hex chars (BLAKE2b, 128 bits).

    ``body`` is the raw JSON request (bytes-like) or the parsed object; both forms of the
    same content give the same key.  ``namespace`` separates caches (tenant, deployment).
    Raises ``CacheKeyError`` when the body has no canonical form.
    """
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    ns = namespace.encode("utf-8", "surrogatepass")
    h = blake2b(VERSION_TAG + len(ns).to_bytes(8, "big") + ns, digest_size=16)
    h.update(canonical_bytes(body))
    return h.hexdigest()
