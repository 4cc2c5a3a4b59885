"""Token buckets: each twin against the pure reference, and the limiter's own guarantees."""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwnative import _buckets_py

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
INF = math.inf


def approx_equal(a: Any, b: Any) -> None:
    """Decisions exactly, floats with pytest.approx (inf included)."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            approx_equal(x, y)
    elif isinstance(a, bool) or a is None:
        assert a is b
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    else:
        assert a == b


def run(impl: ModuleType, table: Any, op: tuple) -> Any:
    name, key, amount, now, cap, rate = op
    if name == "acquire":
        return table.acquire(key, amount, now, cap, rate).astuple()
    if name == "refund":
        return table.refund(key, amount, now, cap, rate)
    if name == "peek":
        return table.peek(key, now, cap, rate)
    return table.evict_idle(now)


KEYS = ["a", "b", "key-123456", "a-key-longer-than-sixteen-bytes", "é", "\u0101", "\x01\x01"]
caps = st.sampled_from([-1.0, 0.0, 1.0, 2.5, 5.0, 10.0])
rates = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0])


@st.composite
def operations(draw: st.DrawFn, backwards: bool = True) -> list[tuple]:
    ops, now = [], draw(st.floats(0, 1000))
    for _ in range(draw(st.integers(0, 60))):
        step = draw(st.one_of(st.floats(0, 5), st.just(0.0),
                              st.floats(-3, 0) if backwards else st.just(0.0)))
        now += step
        name = draw(st.sampled_from(["acquire"] * 4 + ["refund", "peek", "evict"]))
        amount = draw(st.floats(-20, 20) if name == "refund" else
                      st.sampled_from([0.0, 0.5, 1.0, 3.0, 11.0]) | st.floats(0, 12))
        ops.append((name, draw(st.sampled_from(KEYS)), amount, now, draw(caps), draw(rates)))
    return ops


# -- parity -------------------------------------------------------------------------

@SETTINGS
@given(ops=operations(), defaults=st.tuples(st.floats(0, 10), st.floats(0, 3)))
def test_any_operations_give_the_reference_results(
    buckets_impl: ModuleType, ops: list[tuple], defaults: tuple[float, float]
) -> None:
    table = buckets_impl.TokenBuckets(*defaults)
    reference = _buckets_py.TokenBuckets(*defaults)
    for op in ops:
        got, want = run(buckets_impl, table, op), run(_buckets_py, reference, op)
        approx_equal(got, want)
        assert got == want  # the same IEEE operations in the same order: bit for bit
        assert len(table) == len(reference)
    assert table.statistics() == reference.statistics()


def test_many_keys_and_evictions_match_the_reference(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(10.0, 1.0)
    reference = _buckets_py.TokenBuckets(10.0, 1.0)
    keys = [f"key-{i}" for i in range(20000)] + [f"{'long-' * 5}{i}" for i in range(5000)]
    for round_ in range(4):
        now = round_ * 3.0
        for i, key in enumerate(keys):
            if (i + round_) % 3:
                cost = float(i % 13)
                assert (table.acquire(key, cost, now).astuple()
                        == reference.acquire(key, cost, now).astuple())
        assert table.evict_idle(now + 2.0) == reference.evict_idle(now + 2.0)
        assert len(table) == len(reference)
        for key in keys[::7]:
            assert table.peek(key, now + 2.5) == reference.peek(key, now + 2.5)
    assert table.evict_idle(1e9) == reference.evict_idle(1e9) > 0
    assert len(table) == 0
    assert table.statistics() == reference.statistics()


# -- the limiter's guarantees -------------------------------------------------------

@SETTINGS
@given(
    capacity=st.floats(0.5, 20),
    rate=st.floats(0, 5),
    steps=st.lists(st.tuples(st.floats(0, 3), st.floats(0, 10)), max_size=50),
)
def test_admitted_cost_in_any_window_is_within_capacity_plus_refill(
    buckets_impl: ModuleType, capacity: float, rate: float,
    steps: list[tuple[float, float]],
) -> None:
    table = buckets_impl.TokenBuckets(capacity, rate)
    now, admitted = 0.0, []
    for dt, cost in steps:
        now += dt
        if table.acquire("k", cost, now).allowed:
            admitted.append((now, cost))
    for i, (t0, _) in enumerate(admitted):
        for t1, _ in admitted[i:]:
            window = sum(c for t, c in admitted if t0 <= t <= t1)
            bound = capacity + rate * (t1 - t0)
            assert window <= bound + 1e-9 * (1 + bound)


@st.composite
def evictable_operations(draw: st.DrawFn) -> list[tuple]:
    """Nondecreasing times; each key either always uses the defaults or always passes
    its limits (which may change between calls), as the gateway does."""
    custom = {k: draw(st.booleans()) for k in KEYS}
    ops, now = [], 0.0
    for _ in range(draw(st.integers(0, 60))):
        now += draw(st.one_of(st.just(0.0), st.floats(0, 4)))
        key = draw(st.sampled_from(KEYS))
        cap = draw(st.sampled_from([0.0, 1.0, 4.0, 10.0])) if custom[key] else -1.0
        rate = draw(st.sampled_from([0.0, 0.5, 2.0])) if custom[key] else -1.0
        name = draw(st.sampled_from(["acquire"] * 4 + ["refund", "peek", "evict"]))
        amount = draw(st.floats(-10, 10) if name == "refund" else st.floats(0, 12))
        ops.append((name, key, amount, now, cap, rate))
    return ops


@SETTINGS
@given(ops=evictable_operations())
def test_evicting_idle_buckets_never_changes_a_later_answer(
    buckets_impl: ModuleType, ops: list[tuple]
) -> None:
    evicting = buckets_impl.TokenBuckets(5.0, 1.0)
    keeping = buckets_impl.TokenBuckets(5.0, 1.0)
    for op in ops:
        name, _, _, now, _, _ = op
        if name == "evict":
            evicting.evict_idle(now)
            assert len(evicting) <= len(keeping)
            continue
        approx_equal(run(buckets_impl, evicting, op), run(buckets_impl, keeping, op))


# -- behaviour ------------------------------------------------------------------------

def test_a_new_key_starts_full_and_pays_for_each_acquire(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=3.0, refill_per_s=1.0)
    assert table.peek("k", 0.0) == 3.0
    assert len(table) == 0
    assert table.acquire("k", 2.0, 0.0).astuple() == (True, 1.0, 0.0, 3.0, 2.0)
    assert table.acquire("k", 2.0, 0.0).astuple() == (False, 1.0, 1.0, 3.0, 2.0)
    assert table.acquire("k", 2.0, 0.5).astuple() == (False, 1.5, 0.5, 3.0, 1.5)
    assert table.acquire("k", 2.0, 1.0).astuple() == (True, 0.0, 0.0, 3.0, 3.0)
    assert table.acquire("k", 1.0, 100.0).astuple() == (True, 2.0, 0.0, 3.0, 1.0)
    assert len(table) == 1


def test_a_cost_above_capacity_or_no_refill_is_never_admitted(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=3.0, refill_per_s=0.0)
    assert table.acquire("k", 4.0, 0.0).astuple() == (False, 3.0, INF, 3.0, 0.0)
    assert table.acquire("k", 3.0, 0.0).astuple() == (True, 0.0, 0.0, 3.0, INF)
    assert table.acquire("k", 1.0, 1e6).astuple() == (False, 0.0, INF, 3.0, INF)


def test_time_going_back_refills_nothing_and_keeps_the_last_time(
    buckets_impl: ModuleType,
) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    table.acquire("k", 10.0, 100.0)
    assert table.acquire("k", 1.0, 50.0).remaining == 0.0  # earlier: no refill
    assert table.peek("k", 99.0) == 0.0
    assert table.peek("k", 102.0) == 2.0  # still measured from 100, not from 50


def test_limits_given_on_a_call_are_kept_and_adopted(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    assert table.acquire("k", 1.0, 0.0, capacity=4.0, refill_per_s=2.0).astuple() == (
        True, 3.0, 0.0, 4.0, 0.5)
    # negative: unchanged, the key keeps its own limits
    assert table.acquire("k", 1.0, 0.0).astuple() == (True, 2.0, 0.0, 4.0, 1.0)
    assert table.peek("k", 0.5) == 3.0
    # a smaller capacity clamps the tokens
    assert table.acquire("k", 0.0, 0.5, capacity=1.0).astuple() == (True, 1.0, 0.0, 1.0, 0.0)
    # a full bucket stays full when its capacity grows (as an evicted one would)
    assert table.acquire("k", 0.0, 0.5, capacity=6.0).astuple() == (True, 6.0, 0.0, 6.0, 0.0)
    # a bucket that is not full keeps its tokens when the capacity grows
    table.acquire("k", 5.0, 0.5)
    assert table.acquire("k", 0.0, 0.5, capacity=8.0).astuple() == (True, 1.0, 0.0, 8.0, 3.5)
    # the rate changes from now on
    assert table.acquire("k", 0.0, 1.5, refill_per_s=4.0).remaining == 3.0
    assert table.peek("k", 2.0) == 5.0


def test_refund_credits_up_to_capacity_and_debits_down_to_minus_capacity(
    buckets_impl: ModuleType,
) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    table.acquire("k", 8.0, 0.0)
    assert table.refund("k", 3.0, 0.0) == 5.0
    assert table.refund("k", 100.0, 1.0) == 10.0
    assert table.refund("k", -15.0, 1.0) == -5.0
    assert table.acquire("k", 1.0, 1.0).astuple() == (False, -5.0, 6.0, 10.0, 15.0)
    assert table.refund("k", -100.0, 1.0) == -10.0
    assert table.peek("k", 5.0) == -6.0


def test_refund_of_an_unknown_key(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    assert table.refund("k", 5.0, 0.0) == 10.0  # a credit to a full bucket: nothing
    assert len(table) == 0
    assert table.refund("k", -4.0, 0.0) == 6.0  # a debit creates it
    assert len(table) == 1
    assert table.refund("j", -4.0, 0.0, capacity=2.0) == -2.0
    assert table.peek("j", 1.0) == -1.0


def test_peek_changes_nothing(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    table.acquire("k", 10.0, 0.0)
    assert table.peek("k", 4.0) == 4.0
    assert table.peek("k", 4.0, capacity=2.0) == 2.0  # what an acquire with it would see
    assert table.peek("k", 2.0) == 2.0
    assert table.acquire("k", 0.0, 3.0).remaining == 3.0
    assert table.peek("nobody", 0.0) == 10.0 and table.peek("nobody", 0.0, 3.0) == 3.0
    assert len(table) == 1


def test_evict_idle_removes_exactly_the_full_buckets(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=10.0, refill_per_s=1.0)
    for i in range(100):
        table.acquire(f"k{i}", float(i % 11), 0.0)
    assert len(table) == 100
    # k0, k11, ... took nothing: full at once; k{i} is full again after (i % 11) seconds
    assert table.evict_idle(0.0) == 10
    assert table.evict_idle(5.0) == 45
    assert len(table) == 45
    assert table.statistics()["keys"] == 45
    assert table.statistics()["evicted_total"] == 55
    for i in range(100):
        assert table.peek(f"k{i}", 5.0) == min(10.0, 10.0 - (i % 11) + 5.0)
    assert table.evict_idle(1000.0) == 45
    assert len(table) == 0
    assert table.acquire("k1", 1.0, 1000.0).remaining == 9.0


def test_distinct_keys_never_share_a_bucket(buckets_impl: ModuleType) -> None:
    table = buckets_impl.TokenBuckets(capacity=1.0, refill_per_s=0.0)
    # same raw bytes in different widths, prefixes, NUL, long keys differing at the end
    keys = ["\u0101", "\x01\x01", "a", "a\x00", "", "a" * 16, "a" * 17, "x" * 40 + "1",
            "x" * 40 + "2", "é", "e\u0301", "\U0001f600", "\ud83d"]
    for key in keys:
        assert table.acquire(key, 1.0, 0.0).allowed, key
    assert len(table) == len(keys)
    for key in keys:
        assert not table.acquire(key, 1.0, 0.0).allowed, key


def test_str_subclass_keys_are_their_characters(buckets_impl: ModuleType) -> None:
    class Key(str):
        def __hash__(self) -> int:
            return 0

    table = buckets_impl.TokenBuckets(capacity=1.0, refill_per_s=0.0)
    assert table.acquire(Key("a"), 1.0, 0.0).allowed
    assert not table.acquire("a", 1.0, 0.0).allowed
    with pytest.raises(TypeError):
        table.acquire(b"a", 1.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.acquire(1, 1.0, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.acquire("k", -1.0, 0.0),
        lambda t: t.acquire("k", math.nan, 0.0),
        lambda t: t.acquire("k", 1.0, math.nan),
        lambda t: t.acquire("k", 1.0, INF),
        lambda t: t.acquire("k", 1.0, 0.0, capacity=INF),
        lambda t: t.acquire("k", 1.0, 0.0, refill_per_s=math.nan),
        lambda t: t.refund("k", math.nan, 0.0),
        lambda t: t.refund("k", INF, 0.0),
        lambda t: t.peek("k", -INF),
        lambda t: t.evict_idle(math.nan),
    ],
)
def test_nonsense_numbers_are_refused(buckets_impl: ModuleType, call: Any) -> None:
    with pytest.raises(ValueError):
        call(buckets_impl.TokenBuckets(1.0, 1.0))


def test_defaults_must_be_finite_and_not_negative(buckets_impl: ModuleType) -> None:
    for cap, rate in [(-1.0, 1.0), (1.0, -1.0), (INF, 1.0), (1.0, math.nan)]:
        with pytest.raises(ValueError):
            buckets_impl.TokenBuckets(cap, rate)
    table = buckets_impl.TokenBuckets(5, 2)  # ints are numbers too
    assert (table.capacity, table.refill_per_s) == (5.0, 2.0)
    assert table.acquire("k", 1, 0).astuple() == (True, 4.0, 0.0, 5.0, 0.5)
    with pytest.raises(TypeError):
        table.acquire("k", "1", 0.0)  # type: ignore[arg-type]


def test_decisions_are_immutable_values(buckets_impl: ModuleType) -> None:
    d = buckets_impl.Decision(True, 1.0, 0.0, 2.0, 0.5)
    assert d == buckets_impl.Decision(True, 1.0, 0.0, 2.0, 0.5)
    assert hash(d) == hash(buckets_impl.Decision(True, 1.0, 0.0, 2.0, 0.5))
    assert d != buckets_impl.Decision(False, 1.0, 0.0, 2.0, 0.5)
    assert d.astuple() == (True, 1.0, 0.0, 2.0, 0.5)
    assert (d.allowed, d.remaining, d.retry_after_s, d.limit, d.reset_s) == d.astuple()
    assert repr(d) == (
        "Decision(allowed=True, remaining=1.0, retry_after_s=0.0, limit=2.0, reset_s=0.5)")
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
    coerced = buckets_impl.Decision(1, 2, 0, 3, 4)
    assert coerced.astuple() == (True, 2.0, 0.0, 3.0, 4.0)
    assert [type(v) for v in coerced.astuple()] == [bool, float, float, float, float]
