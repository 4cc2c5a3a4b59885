# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""A keyed table of token buckets: the compiled twin of ``_buckets_py``.

Same API, same results (to the bit: the same double operations in the same order, built
with ``-ffp-contract=off``), same exceptions; ``_buckets_py`` is the reference and
documents the arithmetic.

How this one is small and fast: an open-addressing hash table in C that holds no Python
object per key, laid out so that a lookup in a big table costs one cache miss.

* ``ents``: the slots themselves, 64-byte ``Entry`` records (one cache line each): the
  bucket's four doubles, the key's str hash, and the key's characters, inline when they
  fit in 16 bytes (``key-123456`` does), else in their own malloc'd block.
* ``ctrl``: one byte per slot, 0 for empty, else 0x80 | 7 bits of the key's hash.  It is
  small enough (1.3 MB for a million keys) to stay in cache, so probing reads it and
  touches an entry only when the 7 bits match (1 time in 128 for a wrong key).

Linear probing from ``home(hash)`` (the hash's low 32 bits scaled to the table size, so
the size need not be a power of two); the table grows by half when 80% full, which
keeps a million keys in 1.35 million slots.  Deletion (only ``evict_idle`` deletes)
shifts the rest of a probe run back into the hole, so there are no tombstones, and a
mostly emptied table is rebuilt smaller.  Tables of 2 MiB and more ask for transparent
huge pages: random probes then cost no TLB miss.

A key is compared by its exact characters: CPython stores every str in the narrowest of
three widths (its "kind"), so equal strings have equal kind and equal raw bytes, and the
table compares (hash, kind, length, bytes).  The hash is CPython's own str hash (SipHash,
seeded per process), cached in the str object, so an attacker cannot aim keys at one
probe run.

Memory: 65 bytes per slot, 1.25 to 1.9 slots per key: about 88 MB for a million keys.
"""
cimport cython
from cpython.unicode cimport PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND
from libc.math cimport INFINITY
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

__all__ = ["Decision", "TokenBuckets"]

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Large tables are probed at random: back them with 2 MiB pages where the kernel
       allows (transparent huge pages in "madvise" mode), which saves a TLB miss and a
       page walk per probe.  Freed with free(). */
    #define GW_HUGE ((size_t)1 << 21)
    static void *gw_table_alloc(size_t n) {
        void *p = NULL;
        if (n < GW_HUGE)  /* 64-byte aligned: an entry is one cache line */
            return posix_memalign(&p, 64, n) == 0 ? p : NULL;
        if (posix_memalign(&p, GW_HUGE, n) != 0)
            return NULL;
    #ifdef MADV_HUGEPAGE
        (void)madvise(p, n & ~(GW_HUGE - 1), MADV_HUGEPAGE);
    #endif
        return p;
    }
    """
    void* gw_table_alloc(size_t n) nogil

cdef enum:
    INLINE_KEY = 16
    MIN_SLOTS = 16

cdef union KeyBytes:
    char inl[16]
    char* ptr

cdef struct Entry:
    double tokens
    double last
    double cap
    double rate
    Py_hash_t hash
    uint32_t klen      # key length in bytes (characters * kind)
    uint32_t kind      # 1, 2 or 4 bytes per character
    KeyBytes key


@cython.freelist(64)
@cython.final
cdef class Decision:
    """The answer of ``TokenBuckets.acquire``.  Immutable.

    ``allowed``: the cost was taken.  ``remaining``: tokens left after this decision.
    ``retry_after_s``: 0.0 when allowed; else the seconds until ``cost`` tokens are there,
    ``inf`` if never (cost above capacity, or no refill).  ``limit``: the capacity.
    ``reset_s``: seconds until the bucket is full again (``inf`` if it never refills).
    """

    cdef readonly bint allowed
    cdef readonly double remaining
    cdef readonly double retry_after_s
    cdef readonly double limit
    cdef readonly double reset_s

    def __init__(self, bint allowed, double remaining, double retry_after_s, double limit,
                 double reset_s):
        self.allowed = allowed
        self.remaining = remaining
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.reset_s = reset_s

    def astuple(self):
        """``(allowed, remaining, retry_after_s, limit, reset_s)``."""
        return (self.allowed, self.remaining, self.retry_after_s, self.limit, self.reset_s)

    def __eq__(self, other):
        if type(other) is not Decision:
            return NotImplemented
        return self.astuple() == (<Decision>other).astuple()

    def __ne__(self, other):
        if type(other) is not Decision:
            return NotImplemented
        return self.astuple() != (<Decision>other).astuple()

    def __hash__(self):
        return hash(self.astuple())

    def __repr__(self):
        return (
            f"Decision(allowed={self.allowed!r}, remaining={self.remaining!r}, "
            f"retry_after_s={self.retry_after_s!r}, limit={self.limit!r}, "
            f"reset_s={self.reset_s!r})"
        )

    def __reduce__(self):
        return (Decision, self.astuple())


cdef inline Decision decision(bint allowed, double remaining, double retry_after_s,
                              double limit, double reset_s):
    cdef Decision d = Decision.__new__(Decision)
    d.allowed = allowed
    d.remaining = remaining
    d.retry_after_s = retry_after_s
    d.limit = limit
    d.reset_s = reset_s
    return d


cdef str as_key(object key):
    if isinstance(key, str):
        return str.__str__(key)  # a plain str with the same characters
    raise TypeError(f"key must be str, not {type(key).__name__}")


cdef inline int check_limit(str name, double v) except -1:
    if not v < INFINITY:  # NaN or +inf
        raise ValueError(f"{name} must be finite, not {v!r}")
    return 0


cdef inline int check_time(double now) except -1:
    if not (-INFINITY < now < INFINITY):
        raise ValueError(f"now must be finite, not {now!r}")
    return 0


cdef inline double reset_s(double tokens, double cap, double rate) noexcept:
    if tokens < cap:
        if rate == 0.0:
            return INFINITY
        return (cap - tokens) / rate
    return 0.0


cdef inline double refilled(const Entry* e, double now) noexcept:
    """The entry's tokens brought up to ``now`` (no change when ``now`` is earlier)."""
    cdef double tokens = e.tokens
    cdef double elapsed = now - e.last
    if elapsed > 0.0:
        tokens = tokens + elapsed * e.rate
        if tokens > e.cap:
            tokens = e.cap
    return tokens


cdef inline Py_ssize_t home(Py_hash_t h, Py_ssize_t n) noexcept:
    """The first slot to probe for hash h: the low 32 bits scaled to [0, n)."""
    return <Py_ssize_t>(((<uint64_t>(<uint32_t>h)) * <uint64_t>n) >> 32)


cdef inline uint8_t tag_of(Py_hash_t h) noexcept:
    """0x80 | the top 7 bits of the hash: never 0 (the empty mark), and independent of
    the bits ``home`` uses."""
    return <uint8_t>(0x80 | ((<uint64_t>h) >> 57))


cdef inline const char* key_bytes(const Entry* e) noexcept:
    if e.klen <= INLINE_KEY:
        return <const char*>&e.key.inl[0]
    return e.key.ptr


@cython.final
cdef class TokenBuckets:
    """Token buckets keyed by str, with default ``capacity`` and ``refill_per_s``.

    See ``_buckets_py`` for the arithmetic; every method takes ``now``.
    """

    cdef double _capacity, _refill_per_s
    cdef uint8_t* ctrl       # n bytes: 0 = empty slot, else 0x80 | 7 bits of the hash
    cdef Entry* ents         # n entries, slot i of ctrl describes ents[i]
    cdef Py_ssize_t n        # slots
    cdef Py_ssize_t count    # keys held
    cdef Py_ssize_t grow_at  # grow when count would exceed this (load 0.8)
    cdef Py_ssize_t evicted_total

    def __cinit__(self):
        self.ctrl = NULL
        self.ents = NULL
        self.n = self.count = self.grow_at = 0

    def __init__(self, double capacity, double refill_per_s):
        check_limit("capacity", capacity)
        check_limit("refill_per_s", refill_per_s)
        if capacity < 0.0 or refill_per_s < 0.0:
            raise ValueError("the default capacity and refill_per_s must not be negative")
        self._capacity = capacity
        self._refill_per_s = refill_per_s
        self._clear()
        self._resize(MIN_SLOTS)

    def __dealloc__(self):
        self._clear()

    cdef void _clear(self) noexcept:
        cdef Py_ssize_t i
        if self.ctrl != NULL:
            for i in range(self.n):
                if self.ctrl[i] and self.ents[i].klen > INLINE_KEY:
                    free(self.ents[i].key.ptr)
        free(self.ctrl)
        free(self.ents)
        self.ctrl = NULL
        self.ents = NULL
        self.n = self.count = self.grow_at = 0

    @property
    def capacity(self):
        """The default capacity of a new bucket."""
        return self._capacity

    @property
    def refill_per_s(self):
        """The default refill rate of a new bucket, tokens per second."""
        return self._refill_per_s

    # -- the hash table ------------------------------------------------------------

    cdef Py_ssize_t _find(self, str key, Py_hash_t h, Py_ssize_t* slot) except -2:
        """The slot holding ``key``, or -1 with ``*slot`` the empty slot for it."""
        cdef uint32_t kind = PyUnicode_KIND(key)
        cdef const char* kd = <const char*>PyUnicode_DATA(key)
        cdef uint32_t klen = <uint32_t>(PyUnicode_GET_LENGTH(key) * kind)
        cdef uint8_t tag = tag_of(h)
        cdef Py_ssize_t i, n = self.n
        cdef uint8_t c
        cdef Entry* e
        if self.ctrl == NULL:
            raise RuntimeError("TokenBuckets.__init__ was not called")
        i = home(h, n)
        while True:
            c = self.ctrl[i]
            if c == 0:
                slot[0] = i
                return -1
            if c == tag:
                e = &self.ents[i]
                if (e.hash == h and e.klen == klen and e.kind == kind
                        and memcmp(key_bytes(e), kd, klen) == 0):
                    return i
            i += 1
            if i == n:
                i = 0

    cdef int _reserve_one(self, str key) except -1:
        """Room for one more key, before a lookup that may insert (a resize moves slots)."""
        if self.ctrl == NULL:
            raise RuntimeError("TokenBuckets.__init__ was not called")
        if PyUnicode_GET_LENGTH(key) * PyUnicode_KIND(key) > 0xffffffff:
            raise OverflowError("key too long")
        if self.count + 1 > self.grow_at:
            self._resize(self.n + self.n // 2)
        return 0

    cdef int _resize(self, Py_ssize_t n) except -1:
        """Move every key into a new table of ``n`` slots (n > count / 0.8)."""
        cdef uint8_t* ctrl = <uint8_t*>calloc(<size_t>n, 1)
        cdef Entry* ents = <Entry*>gw_table_alloc(<size_t>n * sizeof(Entry))
        cdef Py_ssize_t i, j
        if ctrl == NULL or ents == NULL:
            free(ctrl)
            free(ents)
            raise MemoryError()
        for i in range(self.n):
            if self.ctrl[i]:
                j = home(self.ents[i].hash, n)
                while ctrl[j]:
                    j += 1
                    if j == n:
                        j = 0
                ctrl[j] = self.ctrl[i]
                ents[j] = self.ents[i]
        free(self.ctrl)
        free(self.ents)
        self.ctrl = ctrl
        self.ents = ents
        self.n = n
        self.grow_at = n * 4 // 5
        return 0

    cdef Py_ssize_t _insert(self, str key, Py_hash_t h, Py_ssize_t slot, double tokens,
                            double last, double cap, double rate) except -1:
        """Add ``key`` at the empty ``slot`` found by ``_find`` (after ``_reserve_one``)."""
        cdef uint32_t kind = PyUnicode_KIND(key)
        cdef Py_ssize_t klen = PyUnicode_GET_LENGTH(key) * kind
        cdef Entry* e = &self.ents[slot]
        cdef char* p
        if klen > INLINE_KEY:
            p = <char*>malloc(<size_t>klen)
            if p == NULL:
                raise MemoryError()
            memcpy(p, PyUnicode_DATA(key), <size_t>klen)
            e.key.ptr = p
        else:
            memcpy(e.key.inl, PyUnicode_DATA(key), <size_t>klen)
        e.tokens = tokens
        e.last = last
        e.cap = cap
        e.rate = rate
        e.hash = h
        e.klen = <uint32_t>klen
        e.kind = kind
        self.ctrl[slot] = tag_of(h)
        self.count += 1
        return slot

    cdef void _delete(self, Py_ssize_t i) noexcept:
        """Empty slot i, shifting later keys of its probe run back (no tombstones)."""
        cdef Py_ssize_t j = i, k, n = self.n
        if self.ents[i].klen > INLINE_KEY:
            free(self.ents[i].key.ptr)
        while True:
            j += 1
            if j == n:
                j = 0
            if self.ctrl[j] == 0:
                break
            k = home(self.ents[j].hash, n)
            # The key at j may fill the hole at i unless its home lies in (i, j].
            if (k > i and k <= j) if i <= j else (k > i or k <= j):
                continue
            self.ctrl[i] = self.ctrl[j]
            self.ents[i] = self.ents[j]
            i = j
        self.ctrl[i] = 0
        self.count -= 1

    # -- the operations ------------------------------------------------------------

    def acquire(self, key, double cost, double now, double capacity=-1.0,
                double refill_per_s=-1.0):
        """Take ``cost`` tokens from ``key``'s bucket if it holds that many at ``now``.

        ``capacity`` and ``refill_per_s`` are the key's limits (negative: unchanged).
        """
        cdef Py_hash_t h
        cdef Py_ssize_t slot = 0
        cdef Py_ssize_t j
        cdef Entry* e
        cdef double tokens, cap, rate, elapsed, retry_after
        if type(key) is not str:
            key = as_key(key)
        if not cost >= 0.0:
            raise ValueError(f"cost must be >= 0, not {cost!r}")
        check_time(now)
        check_limit("capacity", capacity)
        check_limit("refill_per_s", refill_per_s)
        h = hash(key)
        self._reserve_one(<str>key)
        j = self._find(<str>key, h, &slot)
        if j < 0:
            cap = capacity if capacity >= 0.0 else self._capacity
            rate = refill_per_s if refill_per_s >= 0.0 else self._refill_per_s
            tokens = cap
            j = self._insert(<str>key, h, slot, tokens, now, cap, rate)
            e = &self.ents[j]
        else:
            e = &self.ents[j]
            tokens = e.tokens
            cap = e.cap
            rate = e.rate
            elapsed = now - e.last
            if elapsed > 0.0:
                tokens = tokens + elapsed * rate
                if tokens > cap:
                    tokens = cap
                e.last = now
            if capacity >= 0.0 and capacity != cap:
                if tokens >= cap or tokens > capacity:  # full stays full; clamp
                    tokens = capacity
                cap = capacity
                e.cap = cap
            if refill_per_s >= 0.0:
                rate = refill_per_s
                e.rate = rate

        if tokens >= cost:
            tokens = tokens - cost
            e.tokens = tokens
            return decision(True, tokens, 0.0, cap, reset_s(tokens, cap, rate))
        e.tokens = tokens
        if cost > cap or rate == 0.0:
            retry_after = INFINITY
        else:
            retry_after = (cost - tokens) / rate
        return decision(False, tokens, retry_after, cap, reset_s(tokens, cap, rate))

    def refund(self, key, double amount, double now, double capacity=-1.0,
               double refill_per_s=-1.0):
        """Credit ``amount`` tokens back (capped at capacity); a negative amount debits.

        Used to settle a reservation once the real usage is known.  The balance may go
        negative, never below ``-capacity``.  Returns the new balance.  A key not held
        counts as a full bucket: a credit leaves it absent, a debit creates it.
        """
        cdef Py_hash_t h
        cdef Py_ssize_t slot = 0
        cdef Py_ssize_t j
        cdef Entry* e
        cdef double tokens, cap, rate, elapsed
        if type(key) is not str:
            key = as_key(key)
        if not (-INFINITY < amount < INFINITY):
            raise ValueError(f"amount must be finite, not {amount!r}")
        check_time(now)
        check_limit("capacity", capacity)
        check_limit("refill_per_s", refill_per_s)
        h = hash(key)
        self._reserve_one(<str>key)
        j = self._find(<str>key, h, &slot)
        if j < 0:
            cap = capacity if capacity >= 0.0 else self._capacity
            if amount >= 0.0:
                return cap
            rate = refill_per_s if refill_per_s >= 0.0 else self._refill_per_s
            j = self._insert(<str>key, h, slot, cap, now, cap, rate)
            e = &self.ents[j]
            tokens = cap
        else:
            e = &self.ents[j]
            tokens = e.tokens
            cap = e.cap
            elapsed = now - e.last
            if elapsed > 0.0:
                tokens = tokens + elapsed * e.rate
                if tokens > cap:
                    tokens = cap
                e.last = now
            if capacity >= 0.0 and capacity != cap:
                if tokens >= cap or tokens > capacity:
                    tokens = capacity
                cap = capacity
                e.cap = cap
            if refill_per_s >= 0.0:
                e.rate = refill_per_s
        tokens = tokens + amount
        if tokens > cap:
            tokens = cap
        if tokens < -cap:
            tokens = -cap
        e.tokens = tokens
        return tokens

    def peek(self, key, double now, double capacity=-1.0, double refill_per_s=-1.0):
        """The tokens ``key`` would hold at ``now`` (with these limits); changes nothing.

        A key not held is full: its capacity (given, or the default).
        """
        cdef Py_ssize_t slot = 0
        cdef Py_ssize_t j
        cdef Entry* e
        cdef double tokens
        if type(key) is not str:
            key = as_key(key)
        check_time(now)
        check_limit("capacity", capacity)
        check_limit("refill_per_s", refill_per_s)
        j = self._find(<str>key, hash(key), &slot)
        if j < 0:
            return capacity if capacity >= 0.0 else self._capacity
        e = &self.ents[j]
        tokens = refilled(e, now)
        if capacity >= 0.0 and capacity != e.cap:
            if tokens >= e.cap or tokens > capacity:
                tokens = capacity
        return tokens

    def evict_idle(self, double now):
        """Remove every bucket that has refilled to its capacity by ``now``.

        A full bucket behaves like an absent one, so this frees memory without changing
        any later decision.  Returns how many buckets were removed.
        """
        cdef Py_ssize_t i = 0, removed = 0, n
        check_time(now)
        if self.ctrl == NULL:
            return 0
        while i < self.n:
            if self.ctrl[i] and refilled(&self.ents[i], now) >= self.ents[i].cap:
                self._delete(i)  # a later key may move into slot i: look at it again
                removed += 1
            else:
                i += 1
        self.evicted_total += removed
        if removed and self.n > MIN_SLOTS and self.count * 5 < self.n:
            n = self.count * 2 if self.count * 2 > MIN_SLOTS else MIN_SLOTS
            try:
                self._resize(n)  # give the memory back
            except MemoryError:
                pass  # the larger table still works
        return removed

    def __len__(self):
        return self.count

    def statistics(self):
        """Numbers for tests and /metrics: keys held, buckets evicted so far, defaults."""
        return {
            "keys": self.count,
            "evicted_total": self.evicted_total,
            "capacity": self._capacity,
            "refill_per_s": self._refill_per_s,
        }

    def __repr__(self):
        return (
            f"<TokenBuckets capacity={self._capacity!r} "
            f"refill_per_s={self._refill_per_s!r} keys={self.count}>"
        )
