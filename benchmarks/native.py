"""Compiled gwnative modules against their pure-Python twins: ops/s and the ratio.

    python benchmarks/native.py            # the figures (about a minute)
    python benchmarks/native.py --quick    # every scenario, briefly (a smoke test)
    python benchmarks/native.py --check    # exit 1 if a target below is missed

Scenarios (each figure is the best of a few timed repetitions, ``time.perf_counter``):

* cachekey: ``cache_key`` of a realistic 1.5 KB chat request (system prompt, a few turns,
  a tool call, two tools; ``benchmarks/data/chat_1_5kb.json``), from the raw bytes and
  from the parsed dict.
* sse: a whole 200-event OpenAI chat stream per op (generated here, deterministically),
  fed in pieces cut at seeded random points (64-1460 bytes, network-sized), and fed one
  event per chunk with every tenth event cut in two (how tokens trickle in).  The naive
  loop (append to a buffer, ``split(b"\\n\\n")``, keep the remainder) runs on the same
  pieces: it finds event boundaries only, decoding nothing.
* buckets: ``acquire`` on random keys of a table holding a million keys; and the RSS
  growth of a fresh process that acquires a million keys ``key-0`` ... ``key-999999``
  once each (read from /proc/self/statm before and after, keys created in between).

Targets: every compiled module at least 5x its twin; the compiled SSE parser at least as
fast as the naive split loop; a million idle keys in under 150 MB.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(__file__).resolve().parent / "data"
MIN_RATIO = 5.0
MAX_IDLE_KEYS_MB = 150.0


def twins(name: str) -> tuple[ModuleType | None, ModuleType]:
    py = importlib.import_module(f"gwnative._{name}_py")
    try:
        c = importlib.import_module(f"gwnative._{name}_c")
    except ImportError:
        c = None
    return c, py


def rate(fn: Callable[[], Any], ops_per_call: int, quick: bool) -> float:
    """Best ops/s over a few repetitions, each long enough to time well."""
    target = 0.005 if quick else 0.2
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= target / 4 or calls >= 1 << 24:
            break
        calls *= 4
    calls = max(1, int(calls * target / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(1 if quick else 5):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return calls * ops_per_call / best


# -- cache keys -----------------------------------------------------------------------

def bench_cachekey(quick: bool) -> list[dict[str, Any]]:
    c, py = twins("cachekey")
    raw = (DATA / "chat_1_5kb.json").read_bytes()
    body = json.loads(raw)
    rows = []
    for label, arg in [(f"cache_key(bytes), {len(raw)} B chat request", raw),
                       ("cache_key(dict), the same request parsed", body)]:
        rows.append({
            "module": "cachekey", "scenario": label, "unit": "keys/s",
            "c": rate(lambda: c.cache_key(arg), 1, quick) if c else None,
            "py": rate(lambda: py.cache_key(arg), 1, quick),
        })
    return rows


# -- SSE ------------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers debug "
         "streaming gateways late at night").split()


def openai_stream(events: int = 200, seed: int = 7) -> bytes:
    """A recorded-style OpenAI chat completion stream: role chunk, content chunks, a
    finish chunk, a usage chunk and [DONE]."""
    rnd = random.Random(seed)
    head = {"id": "chatcmpl-AXb8hQm3kZpR2TnVw9LcYd4EfGh1", "object": "chat.completion.chunk",
            "created": 1732430000, "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0ba0d124f1"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {**head, "choices": [choice], **extra}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    for _ in range(events - 2):
        out.append(chunk({"content": rnd.choice(WORDS) + " "}))
    out.append(chunk({}, "stop"))
    usage = {**head, "choices": [], "usage": {
        "prompt_tokens": 412, "completion_tokens": events, "total_tokens": 412 + events,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}}}
    out.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def network_pieces(stream: bytes, seed: int = 11) -> list[bytes]:
    rnd = random.Random(seed)
    pieces, i = [], 0
    while i < len(stream):
        n = rnd.randint(64, 1460)
        pieces.append(stream[i:i + n])
        i += n
    return pieces


def trickle_pieces(stream: bytes, seed: int = 13) -> list[bytes]:
    rnd = random.Random(seed)
    pieces = []
    for i, event in enumerate(stream.split(b"\n\n")[:-1]):
        event += b"\n\n"
        if i % 10 == 9:
            cut = rnd.randint(1, len(event) - 1)
            pieces += [event[:cut], event[cut:]]
        else:
            pieces.append(event)
    return pieces


def parse_all(impl: ModuleType, pieces: list[bytes]) -> list[Any]:
    parser = impl.SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.close()
    return events


def naive_split(pieces: list[bytes]) -> list[bytes]:
    buf = b""
    events = []
    for piece in pieces:
        buf += piece
        parts = buf.split(b"\n\n")
        buf = parts.pop()
        for part in parts:
            events.append(part)
    return events


def bench_sse(quick: bool) -> list[dict[str, Any]]:
    c, py = twins("sse")
    stream = openai_stream()
    rows = []
    for label, pieces in [
        (f"200-event stream ({len(stream) // 1000} KB), random 64-1460 B pieces",
         network_pieces(stream)),
        ("the same stream, one event per chunk, every 10th cut", trickle_pieces(stream)),
    ]:
        expected = len(naive_split(pieces))
        assert len(parse_all(py, pieces)) == expected
        if c is not None:
            assert [e.astuple() for e in parse_all(c, pieces)] == [
                e.astuple() for e in parse_all(py, pieces)]
        rows.append({
            "module": "sse", "scenario": label, "unit": "streams/s",
            "c": rate(lambda: parse_all(c, pieces), 1, quick) if c else None,
            "py": rate(lambda: parse_all(py, pieces), 1, quick),
            "naive": rate(lambda: naive_split(pieces), 1, quick),
        })
    return rows


# -- token buckets --------------------------------------------------------------------

RSS_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
import importlib
mod = importlib.import_module("gwnative._buckets_{impl}")
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
before = rss()
table = mod.TokenBuckets(100.0, 1.0)
for i in range({keys}):
    table.acquire(f"key-{{i}}", 1.0, 0.0)
after = rss()
assert len(table) == {keys}
print(after - before)
"""


def idle_keys_rss(impl: str, keys: int) -> float | None:
    """RSS growth in bytes of a fresh process holding ``keys`` idle keys."""
    if not Path("/proc/self/statm").exists():
        return None
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE.format(root=str(ROOT), impl=impl, keys=keys)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip())


def bench_buckets(quick: bool) -> list[dict[str, Any]]:
    c, py = twins("buckets")
    n = 20_000 if quick else 1_000_000
    keys = [f"key-{i}" for i in range(n)]
    rnd = random.Random(3)
    sample = [keys[rnd.randrange(n)] for _ in range(20_000 if quick else 200_000)]

    def acquire_rate(mod: ModuleType) -> float:
        table = mod.TokenBuckets(1e12, 1.0)
        for k in keys:
            table.acquire(k, 1.0, 0.0)

        def run() -> None:
            acquire = table.acquire
            for k in sample:
                acquire(k, 1.0, 1.0)

        result = rate(run, len(sample), quick)
        del table
        gc.collect()
        return result

    label_n = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
    return [
        {"module": "buckets", "scenario": f"acquire, random keys of a {label_n}-key table",
         "unit": "ops/s", "c": acquire_rate(c) if c else None, "py": acquire_rate(py)},
        {"module": "buckets", "scenario": f"RSS growth for {label_n} idle keys (fresh process)",
         "unit": "MB", "c": idle_keys_rss("c", n) if c else None,
         "py": idle_keys_rss("py", n), "memory": True},
    ]


# -- report ---------------------------------------------------------------------------

def fmt_rate(x: float | None) -> str:
    if x is None:
        return "not built"
    return f"{x:,.0f}"


def fmt_mb(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e6:.1f} MB ({x / 2**20:.1f} MiB)"


def report(rows: list[dict[str, Any]], quick: bool) -> list[str]:
    print("| module | scenario | compiled | pure | compiled / pure | naive split loop "
          "| compiled / naive |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("memory"):
            print(f"| {r['module']} | {r['scenario']} | {fmt_mb(r['c'])} | {fmt_mb(r['py'])}"
                  f" | | | |")
            continue
        ratio = f"{r['c'] / r['py']:.1f}x" if r["c"] else "n/a"
        naive = fmt_rate(r["naive"]) if "naive" in r else ""
        vs_naive = f"{r['c'] / r['naive']:.2f}x" if "naive" in r and r["c"] else ""
        print(f"| {r['module']} | {r['scenario']} ({r['unit']}) | {fmt_rate(r['c'])} "
              f"| {fmt_rate(r['py'])} | {ratio} | {naive} | {vs_naive} |")
    print()

    missed = []
    for module in ("cachekey", "sse", "buckets"):
        mine = [r for r in rows if r["module"] == module and not r.get("memory")]
        if any(r["c"] is None for r in mine):
            print(f"ratio {module}: n/a (gwnative._{module}_c is not built)")
            continue
        worst = min(r["c"] / r["py"] for r in mine)
        notes = [f"ratio {module}: compiled / pure >= {worst:.1f}x (target >= {MIN_RATIO:g}x)"]
        if worst < MIN_RATIO:
            missed.append(f"{module} ratio {worst:.1f}x")
        if module == "sse":
            vs = min(r["c"] / r["naive"] for r in mine)
            notes.append(f"compiled / naive split loop >= {vs:.2f}x (target >= 1x)")
            if vs < 1.0:
                missed.append(f"sse vs naive {vs:.2f}x")
        if module == "buckets":
            mem = next(r for r in rows if r["module"] == "buckets" and r.get("memory"))
            if mem["c"] is not None:
                notes.append(f"idle keys RSS {mem['c'] / 1e6:.1f} MB "
                             f"(target < {MAX_IDLE_KEYS_MB:g} MB for 1M)")
                if not quick and mem["c"] / 1e6 >= MAX_IDLE_KEYS_MB:
                    missed.append(f"1M idle keys {mem['c'] / 1e6:.1f} MB")
        print("; ".join(notes))
    if quick:
        print("\n(--quick: tiny runs, figures not meaningful, targets not judged)")
        return []
    return missed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="run each scenario briefly")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)
    print(f"Python {sys.version.split()[0]} on {sys.platform}; "
          f"{'quick run' if args.quick else 'best of 5'}\n")
    rows = bench_cachekey(args.quick) + bench_sse(args.quick) + bench_buckets(args.quick)
    missed = report(rows, args.quick)
    if missed:
        print("\nmissed targets: " + ", ".join(missed))
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
