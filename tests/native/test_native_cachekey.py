"""Cache keys: both twins, both input forms, against an independent canonical form."""
from __future__ import annotations

import json
import math
import random
from hashlib import blake2b
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gwnative import _cachekey_py
from gwnative.errors import CacheKeyError

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
IGNORED = {"user", "stream", "stream_options", "metadata", "store", "service_tier"}


# -- an independent canonical form ----------------------------------------------------

def normalized(v: Any) -> Any:
    """Integral floats as ints, as the canonical form counts them."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: normalized(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalized(x) for x in v]
    return v


def expected_key(body: dict[str, Any], namespace: str = "") -> str:
    """The documented framing over json.dumps' sorted compact form."""
    counted = {k: v for k, v in body.items() if k not in IGNORED}
    canonical = json.dumps(
        normalized(counted), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8", "surrogatepass")
    ns = namespace.encode("utf-8", "surrogatepass")
    return blake2b(
        b"gwnative.cache_key.v1\x00" + len(ns).to_bytes(8, "big") + ns + canonical,
        digest_size=16,
    ).hexdigest()


def spellings(body: dict[str, Any], rnd: random.Random) -> list[bytes]:
    """The same request written in different ways."""
    def shuffled(v: Any) -> Any:
        if isinstance(v, dict):
            items = list(v.items())
            rnd.shuffle(items)
            return {k: shuffled(x) for k, x in items}
        if isinstance(v, list):
            return [shuffled(x) for x in v]
        return v

    def floated(v: Any) -> Any:  # 1 -> 1.0: the same number
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**53:
            return float(v)
        if isinstance(v, dict):
            return {k: floated(x) for k, x in v.items()}
        if isinstance(v, list):
            return [floated(x) for x in v]
        return v

    out = [
        json.dumps(body).encode(),
        json.dumps(floated(body)).encode(),
        json.dumps(body, separators=(",", ":"), sort_keys=True).encode(),
        json.dumps(shuffled(body), indent=2).encode(),
        json.dumps(shuffled(body), ensure_ascii=False).encode("utf-8", "surrogatepass"),
    ]
    return [b for b in out if b"\xed" not in b or _valid_utf8(b)]


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- strategies -----------------------------------------------------------------------

texts = st.text(max_size=8)  # surrogates included: json.dumps escapes them as \udXXX
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), texts,
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=16,
)
field_names = st.one_of(texts, st.sampled_from(
    sorted(IGNORED) + ["model", "messages", "temperature", "tools", "max_tokens"]))
requests = st.dictionaries(field_names, values, max_size=6)


# -- equal requests, equal keys -------------------------------------------------------

@SETTINGS
@given(body=requests, seed=st.integers(0, 2**32), namespace=texts)
def test_every_spelling_of_a_request_has_the_documented_key(
    cachekey_impl: ModuleType, body: dict[str, Any], seed: int, namespace: str
) -> None:
    key = expected_key(body, namespace)
    assert cachekey_impl.cache_key(body, namespace) == key
    for raw in spellings(body, random.Random(seed)):
        assert cachekey_impl.cache_key(raw, namespace) == key, raw
        assert cachekey_impl.canonical_bytes(raw) == _cachekey_py.canonical_bytes(body)


@SETTINGS
@given(body=requests, extra=st.dictionaries(st.sampled_from(sorted(IGNORED)), values))
def test_ignored_fields_do_not_count(
    cachekey_impl: ModuleType, body: dict[str, Any], extra: dict[str, Any]
) -> None:
    changed = {**body, **extra}
    assert cachekey_impl.cache_key(changed) == cachekey_impl.cache_key(body)
    assert cachekey_impl.cache_key(json.dumps(changed).encode()) == cachekey_impl.cache_key(body)


def counted_leaves(body: dict[str, Any]) -> list[tuple]:
    """Paths to every leaf that counts (not under an ignored top-level field)."""
    paths: list[tuple] = []

    def walk(v: Any, path: tuple) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(x, path + (k,))
        elif isinstance(v, list) and v:
            for i, x in enumerate(v):
                walk(x, path + (i,))
        else:
            paths.append(path)

    for k, v in body.items():
        if k not in IGNORED:
            walk(v, (k,))
    return paths


def changed_leaf(v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if v is None:
        return 0
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v + 1.0 if v + 1.0 != v else "changed"
    if isinstance(v, str):
        return v + "!"
    return [v]  # an empty container


@SETTINGS
@given(body=requests, data=st.data())
def test_changing_any_counted_leaf_changes_the_key(
    cachekey_impl: ModuleType, body: dict[str, Any], data: st.DataObject
) -> None:
    paths = counted_leaves(body)
    assume(paths)
    path = data.draw(st.sampled_from(paths))
    changed = json.loads(json.dumps(body))
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = changed_leaf(target[path[-1]])
    assert cachekey_impl.cache_key(changed) != cachekey_impl.cache_key(body)
    assert cachekey_impl.cache_key(json.dumps(changed).encode()) != cachekey_impl.cache_key(
        json.dumps(body).encode())


@pytest.mark.parametrize(
    "a, b",
    [
        (b'{"t":1.0}', b'{"t":1}'),
        (b'{"t":1e0}', b'{"t":1}'),
        (b'{"t":10E-1}', b'{"t":1}'),
        (b'{"t":-0.0}', b'{"t":0}'),
        (b'{"t":-0}', b'{"t":0}'),
        (b'{"t":1e2}', b'{"t":100}'),
        (b'{"t":1e20}', b'{"t":100000000000000000000}'),
        (b'{"t":0.10}', b'{"t":0.1}'),
        (b'{"t":1e-400}', b'{"t":0}'),
        (b'{"t":"\\u00e9"}', '{"t":"é"}'.encode()),
        (b'{"t":"\\ud83d\\ude00"}', '{"t":"😀"}'.encode()),
        (b'{"\\u0074":1}', b'{"t":1}'),
        (b'{"t":"\\/"}', b'{"t":"/"}'),
        (b'{"t":"\\u0041"}', b'{"t":"A"}'),
        (b' {\n"a" : [ 1 , 2 ] ,\t"b":{}}\r\n', b'{"b":{},"a":[1,2]}'),
        (b'{"a":1,"a":2}', b'{"a":2}'),
        (b'{"a":{"x":1,"x":{"y":2}},"b":1}', b'{"b":1,"a":{"x":{"y":2}}}'),
        (b'{"user":1,"user":[1],"a":0}', b'{"a":0}'),
        (b'{"stream":true,"a":0}', b'{"a":0,"stream":false,"metadata":{"x":[1]}}'),
    ],
)
def test_spellings_of_the_same_content_are_equal(
    cachekey_impl: ModuleType, a: bytes, b: bytes
) -> None:
    assert cachekey_impl.cache_key(a) == cachekey_impl.cache_key(b)
    assert cachekey_impl.cache_key(a) == _cachekey_py.cache_key(a)
    assert cachekey_impl.cache_key(a) == cachekey_impl.cache_key(json.loads(a))


@pytest.mark.parametrize(
    "a, b",
    [
        (b'{"t":1}', b'{"t":"1"}'),
        (b'{"t":1}', b'{"t":true}'),
        (b'{"t":0}', b'{"t":false}'),
        (b'{"t":null}', b'{"t":"null"}'),
        (b'{"t":0.1}', b'{"t":0.10000000000000002}'),
        (b'{"t":[1,2]}', b'{"t":[2,1]}'),
        (b'{"t":[]}', b'{"t":{}}'),
        (b'{"a":1}', b'{"a":1,"b":null}'),
        (b'{"m":[{"user":"x"}]}', b'{"m":[{"user":"y"}]}'),  # nested: counts
        (b'{"m":{"stream":true}}', b'{"m":{"stream":false}}'),
        (b'{"t":"\\ud83d"}', b'{"t":"\\ude00"}'),
        (b'{"t":"a\\"b"}', b'{"t":"a\\\\b"}'),
        (b'{"a":"b","c":"d"}', b'{"a":"b\\",\\"c\\":\\"d"}'),
        (b'{"ab":1}', b'{"a":1,"b":1}'),
    ],
)
def test_different_content_gives_different_keys(
    cachekey_impl: ModuleType, a: bytes, b: bytes
) -> None:
    assert cachekey_impl.cache_key(a) != cachekey_impl.cache_key(b)


def test_the_namespace_separates_keys(cachekey_impl: ModuleType) -> None:
    body = b'{"model":"m"}'
    keys = {cachekey_impl.cache_key(body, ns) for ns in ["", "a", "b", "tenant-1", "\ud800"]}
    assert len(keys) == 5
    assert cachekey_impl.cache_key(body, "a") == expected_key({"model": "m"}, "a")
    with pytest.raises(TypeError):
        cachekey_impl.cache_key(body, b"a")  # type: ignore[arg-type]


def test_the_key_is_32_lowercase_hex_digits(cachekey_impl: ModuleType) -> None:
    key = cachekey_impl.cache_key({"model": "m", "messages": []})
    assert len(key) == 32 and set(key) <= set("0123456789abcdef")


def test_the_ignored_fields_are_the_documented_ones(cachekey_impl: ModuleType) -> None:
    assert cachekey_impl.IGNORED_FIELDS == frozenset(IGNORED)
    assert cachekey_impl.MAX_DEPTH == 128


def test_bytes_like_bodies_are_the_same_body(cachekey_impl: ModuleType) -> None:
    raw = b'{"model":"m","n":[1,2.5]}'
    key = cachekey_impl.cache_key(raw)
    assert cachekey_impl.cache_key(bytearray(raw)) == key
    assert cachekey_impl.cache_key(memoryview(raw)) == key
    assert cachekey_impl.cache_key(memoryview(bytes(b for c in raw for b in (c, 0)))[::2]) == key


def test_long_integers_and_big_floats(cachekey_impl: ModuleType) -> None:
    digits = "1" + "0" * 5000  # beyond int()'s default digit limit: kept as written
    raw = b'{"n":' + digits.encode() + b"}"
    assert cachekey_impl.canonical_bytes(raw) == _cachekey_py.canonical_bytes(raw)
    assert cachekey_impl.canonical_bytes(raw) == b'{"n":' + digits.encode() + b"}"
    assert cachekey_impl.cache_key({"n": 10**30}) == cachekey_impl.cache_key(
        b'{"n":1000000000000000000000000000000}')
    assert cachekey_impl.cache_key({"n": 1e300}) == cachekey_impl.cache_key(
        b'{"n":' + str(int(1e300)).encode() + b"}")
    assert cachekey_impl.canonical_bytes({"n": [2**63, -(2**63) - 1, 1.5e-7, -2.5]}) == (
        b'{"n":[9223372036854775808,-9223372036854775809,1.5e-07,-2.5]}')


def test_str_subclasses_and_int_subclasses_count_by_value(cachekey_impl: ModuleType) -> None:
    class S(str):
        def __str__(self) -> str:
            return "other"

    class I(int):  # noqa: E742
        def __repr__(self) -> str:
            return "other"

    class F(float):
        def __int__(self) -> int:
            return 7

        def __repr__(self) -> str:
            return "other"

    assert cachekey_impl.cache_key(
        {S("a"): S("b"), "n": I(5), "f": [F(2.0), F(2.5)]}
    ) == cachekey_impl.cache_key(b'{"a":"b","n":5,"f":[2,2.5]}')


# -- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw",
    [
        b"", b" ", b"{", b"}", b'{"a":1', b'{"a":1,}', b'{"a" 1}', b"{'a':1}", b'{"a":}',
        b'{a:1}', b'{"a":1}x', b'{"a":1} {}', b'{"a":01}', b'{"a":1.}', b'{"a":.5}',
        b'{"a":1e}', b'{"a":-}', b'{"a":+1}', b'{"a":0x10}', b'{"a":NaN}',
        b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":1e400}', b'{"a":-1e400}',
        b'{"a":tru}', b'{"a":nul}', b'{"a":True}', b'{"a":"\x01"}', b'{"a":"\n"}',
        b'{"a":"\\x"}', b'{"a":"\\u12"}', b'{"a":"\\u12g4"}', b'{"a":"\\ud83d\\u12"}',
        b'{"a":"unterminated}', b'{"a":"\xff"}', b'{"a":"\xc3"}', b'{"a":"\xc0\x80"}',
        b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'\xef\xbb\xbf{"a":1}',
        b'{"a":1}\x00', b'{"a":[1,2}', b'{"a":[1,,2]}', b'{"a":[,]}', b'{"a"\xc2\xa0:1}',
        b"[]", b"[1]", b'"a"', b"1", b"null", b"true",
        b'{"stream":NaN}', b'{"user":"\xff"}', b'{"metadata":[1,]}',
    ],
)
def test_invalid_json_is_a_cache_key_error(cachekey_impl: ModuleType, raw: bytes) -> None:
    with pytest.raises(CacheKeyError):
        cachekey_impl.cache_key(raw)
    with pytest.raises(CacheKeyError):
        _cachekey_py.cache_key(raw)  # the reference agrees


@pytest.mark.parametrize(
    "body",
    [
        {1: "a"}, {"a": {None: 1}}, {"a": math.nan}, {"a": math.inf}, {"a": [-math.inf]},
        {"a": {1, 2}}, {"a": (1, 2)}, {"a": b"x"}, {"a": object()}, {"stream": math.nan},
        [], "a", 1, None, ("a", 1), "{}",
    ],
)
def test_non_json_values_are_a_cache_key_error(cachekey_impl: ModuleType, body: Any) -> None:
    with pytest.raises(CacheKeyError):
        cachekey_impl.cache_key(body)


def nested(depth: int) -> tuple[bytes, dict[str, Any]]:
    """A request whose deepest container is at ``depth`` (the top object is 1)."""
    raw = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return raw, {"a": value}


def test_nesting_up_to_128_is_fine_deeper_is_an_error(cachekey_impl: ModuleType) -> None:
    raw, body = nested(128)
    assert cachekey_impl.cache_key(raw) == cachekey_impl.cache_key(body)
    raw, body = nested(129)
    for form in (raw, body, {"stream": body["a"]}, b'{"stream":' + raw[5:]):
        with pytest.raises(CacheKeyError):
            cachekey_impl.cache_key(form)


def test_hostile_nesting_is_an_error_not_a_crash(cachekey_impl: ModuleType) -> None:
    with pytest.raises(CacheKeyError):
        cachekey_impl.cache_key(b'{"a":' + b"[" * 200_000)
    with pytest.raises(CacheKeyError):
        cachekey_impl.cache_key(b'{"a":' + b'{"a":' * 200_000)
    cycle: dict[str, Any] = {}
    cycle["a"] = cycle
    with pytest.raises(CacheKeyError):
        cachekey_impl.cache_key(cycle)


# -- fuzz: the scanner agrees with json.loads on what is JSON --------------------------

mutations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "replace"]),
        st.floats(0, 1),
        st.sampled_from([b'"', b"\\", b"u", b"{", b"}", b"[", b"]", b",", b":", b"0", b"-",
                         b"e", b".", b" ", b"\xff", b"\xc3", b"\xa9", b"\x00", b"\\u", b"d8",
                         b"n", b"1"]),
    ),
    min_size=1, max_size=3,
)


@SETTINGS
@given(body=requests, edits=mutations)
def test_mutated_json_is_judged_like_json_loads_judges_it(
    cachekey_impl: ModuleType, body: dict[str, Any], edits: list[tuple]
) -> None:
    raw = bytearray(json.dumps(body).encode())
    for how, where, what in edits:
        i = int(where * len(raw))
        if how == "insert":
            raw[i:i] = what
        elif how == "delete":
            del raw[i:i + 1]
        else:
            raw[i:i + 1] = what
    data = bytes(raw)
    try:
        want = _cachekey_py.cache_key(data)
    except CacheKeyError:
        with pytest.raises(CacheKeyError):
            cachekey_impl.cache_key(data)
    else:
        assert cachekey_impl.cache_key(data) == want
