"""Fuzzing the gwnative hot-path modules with arbitrary input, both twins in lockstep.

tests/native checks each twin against a reference on inputs shaped like the formats;
here the input is anything at all (random bytes, random Python objects, JSON spelt any
way), and the claims are the robustness ones:

* ``SSEParser``: only ``SSEError`` (the module's documented error) is ever raised, at
  the same ``feed`` call in both twins, which return the same events; whether a stream
  raises does not depend on its chunking, and without an error any chunking gives the
  events of one feed.
* ``encode_event`` / ``encode_comment``: both twins give the same bytes or raise the
  same exception type, for any text (lone surrogates, line ends, NUL) and any retry.
* ``cache_key``: any bytes give a key or ``CacheKeyError``, the same in both twins; any
  JSON the gateway accepts (orjson, nesting within MAX_DEPTH) gives a key, the same for
  its bytes and its parsed form, whatever the key order and spelling.
"""
from __future__ import annotations

import json
import math
import random
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwnative.errors import CacheKeyError, SSEError
from tests.native.conftest import load_twin


@pytest.fixture(scope="module")
def twins() -> dict[str, tuple[ModuleType, ModuleType]]:
    """(compiled, pure) per module; the pure one twice when only it is available."""
    out = {}
    for name in ("sse", "cachekey"):
        py = load_twin(name, "py")
        try:
            c = load_twin(name, "c")
        except pytest.skip.Exception:  # GWNATIVE_PURE and not built: py against itself
            c = py
        out[name] = (c, py)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def run(parser: Any, pieces: list[bytes]) -> list[Any]:
    """Per feed call: its events as tuples, or the exception type it raised; then close."""
    out: list[Any] = []
    for piece in pieces:
        try:
            out.append([e.astuple() for e in parser.feed(piece)])
        except SSEError:
            out.append(SSEError)
    out.append(("close", parser.close(), parser.truncated))
    return out


sse_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([b"data:", b"data: x", b"event:e", b"id:\x00", b"id: 7",
                              b"retry: 99999999999999999999", b":", b"\r", b"\n", b"\r\n",
                              b"\xef\xbb\xbf", b"\xef\xbb", b"\xff", b"\xc3", b"\xa9",
                              b"\x00", b" ", b"data" * 20]), max_size=60).map(b"".join))


@settings(max_examples=300)
@given(stream=sse_bytes, limit=st.one_of(st.none(), st.integers(1, 64)),
       cuts=st.lists(st.integers(0, 400), max_size=10),
       kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_sse_parser_on_any_bytes(twins, stream: bytes, limit: int | None, cuts: list[int],
                                 kind: str) -> None:
    c, py = twins["sse"]
    kw = {} if limit is None else {"max_event_bytes": limit}
    wrap = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind]
    pieces = [wrap(p) for p in split_at(stream, cuts)] + [b"", wrap(b"data: after\n\n")]
    # The twins agree call by call: same events, same raising call, same truncation.
    got = run(c.SSEParser(**kw), pieces)
    assert got == run(py.SSEParser(**kw), pieces)
    # Chunking changes only which call raises, never whether, nor the events.
    whole = run(py.SSEParser(**kw), [stream, b"", b"data: after\n\n"])
    raised = SSEError in got
    assert raised == (SSEError in whole)
    if not raised:
        events = [e for call in got[:-1] for e in call]
        assert events == [e for call in whole[:-1] for e in call]
        assert got[-1] == whole[-1]
    else:
        # After an error the parser is finished: every later feed raises too.
        first = got.index(SSEError)
        assert all(r is SSEError for r in got[first:-1])


@settings(max_examples=100)
@given(value=st.one_of(st.text(max_size=5), st.integers(), st.none(), st.floats(),
                       st.lists(st.integers(0, 255), max_size=3)))
def test_sse_parser_refuses_what_is_not_bytes_alike_in_both_twins(twins, value: Any) -> None:
    c, py = twins["sse"]
    outcomes = []
    for impl in (c, py):
        try:
            impl.SSEParser().feed(value)
            outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] in (TypeError, "ok"), outcomes


any_text = st.text(alphabet=st.characters(), max_size=12)  # lone surrogates included
line_texts = st.one_of(any_text, st.sampled_from(["a\rb", "a\nb", "a\r\nb", "\x00", "\r",
                                                  "\ud800", "x\udfff", "", " "]))


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)


@settings(max_examples=300)
@given(data=st.one_of(line_texts, st.binary(max_size=12)),
       event=st.one_of(st.none(), line_texts), id_=st.one_of(st.none(), line_texts),
       retry=st.one_of(st.none(), st.integers(-2, 2**70), st.booleans()),
       comment=line_texts)
def test_encoders_agree_on_any_text(twins, data: Any, event: Any, id_: Any, retry: Any,
                                    comment: str) -> None:
    c, py = twins["sse"]
    got = outcome(c.encode_event, data, event, id_, retry)
    assert got == outcome(py.encode_event, data, event, id_, retry)
    assert got in (TypeError, ValueError, UnicodeEncodeError) or isinstance(got, bytes), got
    if isinstance(got, bytes):  # what the writer writes, the parser reads back
        parser = py.SSEParser()
        (ev,) = parser.feed(got)
        assert ev.event == (event or "") and ev.id == id_ and ev.retry == retry
    assert outcome(c.encode_comment, comment) == outcome(py.encode_comment, comment)


# -- cache keys ---------------------------------------------------------------------------

# JSON values as orjson hands them to the gateway, and a few it would not (big ints).
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from([0.0, -0.0, 1e308, 5e-324, 1.0, 1e16, 123456789012345678.0]),
              st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)
requests = st.dictionaries(st.sampled_from(["model", "messages", "stream", "user", "tools",
                                            "metadata", "temperature", "n", "x", ""]),
                           json_values, max_size=6)


def spell(value: Any, rng: random.Random) -> str:
    """``value`` as JSON text with random key order, spacing and escaping."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        sp = rng.choice(["", " ", "\n\t "])
        return "{" + ",".join(f"{sp}{json.dumps(k, ensure_ascii=rng.random() < 0.5)}{sp}:"
                              f"{sp}{spell(v, rng)}" for k, v in items) + sp + "}"
    if isinstance(value, list):
        return "[" + ",".join(spell(v, rng) for v in value) + "]"
    # (Not for -0.0: "0.0e0" would spell +0.0, another value.)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 \
            and math.copysign(1.0, value) > 0 and rng.random() < 0.5:
        return rng.choice([f"{value:.1f}", f"{int(value)}.0e0", f"{int(value)}E+0"])
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


@settings(max_examples=300)
@given(body=requests, seed=st.integers(0, 2**32), namespace=st.text(max_size=6))
def test_cache_key_of_any_json_is_stable_across_spellings_and_twins(
        twins, body: dict, seed: int, namespace: str) -> None:
    c, py = twins["cachekey"]
    rng = random.Random(seed)
    key = py.cache_key(body, namespace)
    for impl in (c, py):
        assert impl.cache_key(body, namespace) == key
        assert impl.cache_key(spell(body, rng).encode(), namespace) == key
        assert impl.cache_key(orjson.dumps(body) if _orjson_ok(body) else
                              json.dumps(body).encode(), namespace) == key


def _orjson_ok(body: Any) -> bool:
    try:
        orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits
        return False
    return True


@settings(max_examples=300)
@given(raw=st.one_of(st.binary(max_size=200),
                     requests.map(lambda b: json.dumps(b).encode()).flatmap(
                         lambda raw: st.tuples(st.just(raw), st.integers(0, len(raw)),
                                               st.binary(min_size=1, max_size=3))
                         .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]))))
def test_cache_key_of_any_bytes_is_a_key_or_a_cache_key_error_in_both_twins(
        twins, raw: bytes) -> None:
    c, py = twins["cachekey"]
    got = outcome(c.cache_key, raw)
    assert got == outcome(py.cache_key, raw)
    assert got is CacheKeyError or (isinstance(got, str) and len(got) == 32), got
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if isinstance(parsed, dict):  # what the gateway accepts has a key
        assert isinstance(got, str), raw


class Odd:
    pass


@settings(max_examples=200)
@given(value=st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=3), st.binary(max_size=3),
              st.sampled_from([Odd(), (1, 2), {1, 2}, frozenset(), math.nan, math.inf, 1j,
                               bytearray(b"x"), ...])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=3), st.integers(),
                                                      st.none()), inner, max_size=3)),
    max_leaves=8))
def test_cache_key_of_any_python_object_is_a_key_or_a_cache_key_error(twins, value: Any) -> None:
    c, py = twins["cachekey"]
    body = {"v": value}
    got = outcome(c.cache_key, body)
    assert got == outcome(py.cache_key, body)
    assert got is CacheKeyError or isinstance(got, str), got


@pytest.mark.parametrize("depth", [127, 128, 129, 300, 1000, 1024])
def test_cache_key_at_every_depth_orjson_accepts(twins, depth: int) -> None:
    # The gateway parses bodies with orjson (up to 1024 levels): beyond MAX_DEPTH (128)
    # the key is a CacheKeyError, never a RecursionError or a crash, in both twins.
    raw = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    orjson.loads(raw)
    for impl in twins["cachekey"]:
        got = outcome(impl.cache_key, raw)
        assert (got is CacheKeyError) == (depth > 128), got
        got = outcome(impl.cache_key, orjson.loads(raw))
        assert (got is CacheKeyError) == (depth > 128), got
