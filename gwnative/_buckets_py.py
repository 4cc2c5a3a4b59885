"""A keyed table of token buckets: the pure-Python twin, and the reference.

The gateway keeps one table per limit dimension (requests per window, tokens per
minute; per gateway key, per model).  Nothing here reads a clock: every call is given
``now`` (seconds on a monotonic clock, a float), so decisions are deterministic and tests
need no sleeping.

How this works
--------------
A bucket holds ``tokens`` (a float, at most ``capacity``), the time ``last`` it was
brought up to date, and its own ``capacity`` and ``refill_per_s``.  Every operation
first refills the bucket to ``now``::

    elapsed = now - last
    if elapsed > 0:                      # an earlier `now` counts as no time:
        tokens = tokens + elapsed * rate #   never refill backwards,
        if tokens > capacity:            #   never move `last` backwards
            tokens = capacity
        last = now

then, if the call gives a capacity or rate different from the bucket's, adopts it: tokens
are clamped to a smaller capacity, and a bucket that was full stays full (so a full
bucket behaves exactly like an absent one, which starts full).  A key never seen starts
full with the call's limits, or the table's defaults.

Operations on one bucket::

    call                          tokens afterwards                      creates a bucket
    ----------------------------  -------------------------------------  -----------------
    acquire(cost), tokens >= cost tokens - cost (allowed)                yes
    acquire(cost), tokens < cost  unchanged (denied)                     yes
    refund(+amount)               min(capacity, tokens + amount)         no (absent = full)
    refund(-amount)               max(-capacity, tokens - amount)        yes
    peek                          unchanged (nothing is stored)          no
    evict_idle                    removes the bucket if full by `now`    no

A negative ``refund`` records real usage beyond a reservation, so the balance may go
below zero (the debt is repaid by refill before the next request is allowed), but never
below ``-capacity``.  ``evict_idle`` drops exactly the buckets that are full, which are
indistinguishable from absent ones, so eviction never changes a later decision provided
the key's limits are passed on every call (an evicted bucket forgets limits that were
only given on earlier calls) and ``now`` does not go back before the eviction.

Limits: ``capacity`` and ``refill_per_s`` on a call are the key's limits; a negative
value (the default) means "unchanged": the bucket's own limit, or for a key not held the
table's default.  So the gateway passes a key's limits on every call when they differ
from the defaults.

Floats: both twins do the same IEEE-754 double operations in the same order (the C build
compiles with ``-ffp-contract=off``: no fused multiply-add), so their results are equal
to the bit.
"""
from __future__ import annotations

__all__ = ["Decision", "TokenBuckets"]

_INF = float("inf")
_object_setattr = object.__setattr__
_object_new = object.__new__


class Decision:
    """The answer of ``TokenBuckets.acquire``.  Immutable.

    ``allowed``: the cost was taken.  ``remaining``: tokens left after this decision.
    ``retry_after_s``: 0.0 when allowed; else the seconds until ``cost`` tokens are there,
    ``inf`` if never (cost above capacity, or no refill).  ``limit``: the capacity.
    ``reset_s``: seconds until the bucket is full again (``inf`` if it never refills).
    """

    __slots__ = ("allowed", "remaining", "retry_after_s", "limit", "reset_s")

    allowed: bool
    remaining: float
    retry_after_s: float
    limit: float
    reset_s: float

    def __init__(
        self, allowed: bool, remaining: float, retry_after_s: float, limit: float,
        reset_s: float,
    ) -> None:
        _object_setattr(self, "allowed", bool(allowed))
        _object_setattr(self, "remaining", _as_float(remaining))
        _object_setattr(self, "retry_after_s", _as_float(retry_after_s))
        _object_setattr(self, "limit", _as_float(limit))
        _object_setattr(self, "reset_s", _as_float(reset_s))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Decision is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Decision is immutable: cannot delete {name!r}")

    def astuple(self) -> tuple[bool, float, float, float, float]:
        """``(allowed, remaining, retry_after_s, limit, reset_s)``."""
        return (self.allowed, self.remaining, self.retry_after_s, self.limit, self.reset_s)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Decision:
            return NotImplemented
        return self.astuple() == other.astuple()  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        if type(other) is not Decision:
            return NotImplemented
        return self.astuple() != other.astuple()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.astuple())

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed!r}, remaining={self.remaining!r}, "
            f"retry_after_s={self.retry_after_s!r}, limit={self.limit!r}, "
            f"reset_s={self.reset_s!r})"
        )

    def __reduce__(self) -> tuple[type, tuple[bool, float, float, float, float]]:
        return (Decision, self.astuple())


def _decision(
    allowed: bool, remaining: float, retry_after_s: float, limit: float, reset_s: float
) -> Decision:
    """The table's decisions: its values are floats already."""
    d = _object_new(Decision)
    _object_setattr(d, "allowed", allowed)
    _object_setattr(d, "remaining", remaining)
    _object_setattr(d, "retry_after_s", retry_after_s)
    _object_setattr(d, "limit", limit)
    _object_setattr(d, "reset_s", reset_s)
    return d


def _as_key(key: object) -> str:
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)  # a plain str with the same characters
    raise TypeError(f"key must be str, not {type(key).__name__}")


def _as_float(value: object) -> float:
    """float(value) for a real number; like a C double argument, refuses str and bytes."""
    if type(value) is float:
        return value  # type: ignore[return-value]
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(value)  # type: ignore[arg-type]


def _limit(name: str, value: object) -> float:
    """A capacity or rate: a finite float; negative means "unchanged"."""
    v = _as_float(value)
    if not v < _INF:  # NaN or +inf
        raise ValueError(f"{name} must be finite, not {v!r}")
    return v


def _time(now: object) -> float:
    t = _as_float(now)
    if not -_INF < t < _INF:
        raise ValueError(f"now must be finite, not {t!r}")
    return t


def _reset_s(tokens: float, cap: float, rate: float) -> float:
    if tokens < cap:
        if rate == 0.0:
            return _INF
        return (cap - tokens) / rate
    return 0.0


class TokenBuckets:
    """Token buckets keyed by str, with default ``capacity`` and ``refill_per_s``.

    See the module docstring for the arithmetic; every method takes ``now``.
    """

    __slots__ = ("_capacity", "_refill_per_s", "_buckets", "_evicted_total")

    def __init__(self, capacity: float, refill_per_s: float) -> None:
        cap = _limit("capacity", capacity)
        rate = _limit("refill_per_s", refill_per_s)
        if cap < 0.0 or rate < 0.0:
            raise ValueError("the default capacity and refill_per_s must not be negative")
        self._capacity = cap
        self._refill_per_s = rate
        # key -> [tokens, last, capacity, refill_per_s]
        self._buckets: dict[str, list[float]] = {}
        self._evicted_total = 0

    @property
    def capacity(self) -> float:
        """The default capacity of a new bucket."""
        return self._capacity

    @property
    def refill_per_s(self) -> float:
        """The default refill rate of a new bucket, tokens per second."""
        return self._refill_per_s

    def acquire(
        self, key: str, cost: float, now: float, capacity: float = -1.0,
        refill_per_s: float = -1.0,
    ) -> Decision:
        """Take ``cost`` tokens from ``key``'s bucket if it holds that many at ``now``.

        ``capacity`` and ``refill_per_s`` are the key's limits (negative: unchanged).
        """
        if type(key) is not str:
            key = _as_key(key)
        if type(cost) is not float:
            cost = _as_float(cost)
        if not cost >= 0.0:
            raise ValueError(f"cost must be >= 0, not {cost!r}")
        if type(now) is not float or not -_INF < now < _INF:
            now = _time(now)
        if type(capacity) is not float or not capacity < _INF:
            capacity = _limit("capacity", capacity)
        if type(refill_per_s) is not float or not refill_per_s < _INF:
            refill_per_s = _limit("refill_per_s", refill_per_s)

        b = self._buckets.get(key)
        if b is None:
            cap = capacity if capacity >= 0.0 else self._capacity
            rate = refill_per_s if refill_per_s >= 0.0 else self._refill_per_s
            tokens = cap
            b = [tokens, now, cap, rate]
            self._buckets[key] = b
        else:
            tokens, last, cap, rate = b
            elapsed = now - last
            if elapsed > 0.0:
                tokens = tokens + elapsed * rate
                if tokens > cap:
                    tokens = cap
                b[1] = now
            if capacity >= 0.0 and capacity != cap:
                if tokens >= cap or tokens > capacity:  # full stays full; clamp
                    tokens = capacity
                cap = capacity
                b[2] = cap
            if refill_per_s >= 0.0:
                rate = refill_per_s
                b[3] = rate

        if tokens >= cost:
            tokens = tokens - cost
            b[0] = tokens
            return _decision(True, tokens, 0.0, cap, _reset_s(tokens, cap, rate))
        b[0] = tokens
        if cost > cap or rate == 0.0:
            retry_after = _INF
        else:
            retry_after = (cost - tokens) / rate
        return _decision(False, tokens, retry_after, cap, _reset_s(tokens, cap, rate))

    def refund(
        self, key: str, amount: float, now: float, capacity: float = -1.0,
        refill_per_s: float = -1.0,
    ) -> float:
        """Credit ``amount`` tokens back (capped at capacity); a negative amount debits.

        Used to settle a reservation once the real usage is known.  The balance may go
        negative, never below ``-capacity``.  Returns the new balance.  A key not held
        counts as a full bucket: a credit leaves it absent, a debit creates it.
        """
        if type(key) is not str:
            key = _as_key(key)
        if type(amount) is not float:
            amount = _as_float(amount)
        if not -_INF < amount < _INF:
            raise ValueError(f"amount must be finite, not {amount!r}")
        now = _time(now)
        capacity = _limit("capacity", capacity)
        refill_per_s = _limit("refill_per_s", refill_per_s)

        b = self._buckets.get(key)
        if b is None:
            cap = capacity if capacity >= 0.0 else self._capacity
            if amount >= 0.0:
                return cap
            rate = refill_per_s if refill_per_s >= 0.0 else self._refill_per_s
            b = [cap, now, cap, rate]
            self._buckets[key] = b
            tokens = cap
        else:
            tokens, last, cap, rate = b
            elapsed = now - last
            if elapsed > 0.0:
                tokens = tokens + elapsed * rate
                if tokens > cap:
                    tokens = cap
                b[1] = now
            if capacity >= 0.0 and capacity != cap:
                if tokens >= cap or tokens > capacity:
                    tokens = capacity
                cap = capacity
                b[2] = cap
            if refill_per_s >= 0.0:
                b[3] = refill_per_s
        tokens = tokens + amount
        if tokens > cap:
            tokens = cap
        if tokens < -cap:
            tokens = -cap
        b[0] = tokens
        return tokens

    def peek(
        self, key: str, now: float, capacity: float = -1.0, refill_per_s: float = -1.0
    ) -> float:
        """The tokens ``key`` would hold at ``now`` (with these limits); changes nothing.

        A key not held is full: its capacity (given, or the default).
        """
        if type(key) is not str:
            key = _as_key(key)
        now = _time(now)
        capacity = _limit("capacity", capacity)
        _limit("refill_per_s", refill_per_s)
        b = self._buckets.get(key)
        if b is None:
            return capacity if capacity >= 0.0 else self._capacity
        tokens, last, cap, rate = b
        elapsed = now - last
        if elapsed > 0.0:
            tokens = tokens + elapsed * rate
            if tokens > cap:
                tokens = cap
        if capacity >= 0.0 and capacity != cap:
            if tokens >= cap or tokens > capacity:
                tokens = capacity
        return tokens

    def evict_idle(self, now: float) -> int:
        """Remove every bucket that has refilled to its capacity by ``now``.

        A full bucket behaves like an absent one, so this frees memory without changing
        any later decision.  Returns how many buckets were removed.
        """
        now = _time(now)
        idle = []
        for key, (tokens, last, cap, rate) in self._buckets.items():
            elapsed = now - last
            if elapsed > 0.0:
                tokens = tokens + elapsed * rate
                if tokens > cap:
                    tokens = cap
            if tokens >= cap:
                idle.append(key)
        buckets = self._buckets
        for key in idle:
            del buckets[key]
        if len(idle) * 2 > len(buckets):
            self._buckets = dict(buckets)  # let the dict shrink after a mass eviction
        self._evicted_total += len(idle)
        return len(idle)

    def __len__(self) -> int:
        return len(self._buckets)

    def statistics(self) -> dict[str, float]:
        """Numbers for tests and /metrics: keys held, buckets evicted so far, defaults."""
        return {
            "keys": len(self._buckets),
            "evicted_total": self._evicted_total,
            "capacity": self._capacity,
            "refill_per_s": self._refill_per_s,
        }

    def __repr__(self) -> str:
        return (
            f"<TokenBuckets capacity={self._capacity!r} refill_per_s={self._refill_per_s!r} "
            f"keys={len(self._buckets)}>"
        )
