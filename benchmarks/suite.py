#!/usr/bin/env python3
"""The benchmark suite: the gateway (or any OpenAI-compatible gateway) against the direct upstream.

    # everything, spawned and pinned (gateway on CPU 0; mock upstream, wrk and this on CPU 1)
    python -m benchmarks                          # or: python benchmarks/suite.py
    # a smoke run of every scenario (about 40 s)
    python -m benchmarks --quick
    # some scenarios, more repetitions
    python -m benchmarks --scenarios latency,throughput --repeat 5
    # other gateways too, all pointed at one mock upstream you started
    python benchmarks/mock_upstream.py --port 9100 &
    python -m benchmarks --upstream http://127.0.0.1:9100/v1 \\
        --target http://127.0.0.1:4000/v1 --key sk-litellm --name litellm [--target-pid PID] [--spawn]

Scenarios (``--scenarios``, comma-separated; default all):

    latency       c=1: p50/p99 per target, added over the direct upstream
    throughput    c=32 and c=256 (``--connections``): req/s, p99, ratio to the upstream
    maxrate       the highest paced rate with p99 under 5 ms (``--p99-budget-ms``), by bisection
    stream        streamed req/s at c=32; time to first token at c=1; per-chunk overhead
    slow-streams  N concurrent slow streams (``--slow-streams 2000``): how many complete,
                  time to first token at that load, memory per open stream, idle RSS
    cpu           gateway CPU time per request at a paced rate (``--cpu-rate 1000``), wake-ups
    counts        Python calls and trio task steps per request (cProfile, ``--counts-rate 500``)
                  of the gateway and the floor: figures a noisy machine does not move
    cache         the response cache on, the same request repeated (hits), vs the upstream
    full-stack    Redis rate limits + Postgres audit (both started for the run)

Every figure is the median of ``--repeat`` runs. The report goes to
``benchmarks/results/<time>/`` (``--out``): ``report.md``, ``report.json`` and
``latency.png``; the Markdown is printed too.

Exit status: 0, 1 if a run saw errors (non-2xx answers, socket errors, failed streams;
the report is still written), 2 if the benchmark could not run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks import profiled  # noqa: E402
from benchmarks import report as reporting  # noqa: E402
from benchmarks.clients import (  # noqa: E402
    WrkResult,
    distribution,
    paced_connections,
    require_wrk,
    run_wrk,
    slow_streams,
    stream_timings,
)
from benchmarks.load import MODEL, BenchError, Endpoint, can_pin, chat_body, cpu_set, preflight  # noqa: E402
from benchmarks.stack import (  # noqa: E402
    GATEWAY_KEY,
    UPSTREAM_KEY,
    Spawned,
    Stack,
    cpu_seconds,
    gateway_version,
    pid_alive,
    raise_nofile_limit,
    rss_bytes,
    wakeups,
)

SCENARIOS = ("latency", "throughput", "maxrate", "stream", "slow-streams", "cpu", "counts", "cache", "full-stack")
RESULTS = ROOT / "benchmarks" / "results"
# The default mock reply: 9 words, so a stream has 9 token events (12 SSE events in all).
REPLY_WORDS = 9
# The long stream of the per-chunk figure: 100 tokens, about 25 KB.
CHUNK_WORDS = 100
GATEWAY = "gwcore"
MINIMAL = "trio+h11 minimal"


@dataclass
class Target:
    name: str
    role: str  # "upstream" or "target"
    url: str  # base URL, ".../v1"
    key: str
    pid: int | None = None
    about: str = ""
    spawned: Spawned | None = None


class Ctx:
    """What the scenarios share: the arguments, the processes, the runs already made."""

    def __init__(self, args: argparse.Namespace, stack: Stack, upstream: Target, targets: list[Target]) -> None:
        self.args = args
        self.stack = stack
        self.upstream = upstream
        self.targets = targets
        self.memo: dict[tuple[Any, ...], WrkResult] = {}
        self.warmed: set[tuple[str, bytes]] = set()
        self.scratch = stack.scratch
        self.chat = chat_body(False)
        self.stream = chat_body(True)
        self.stream_answer: dict[str, int] = {}

    @property
    def endpoints(self) -> list[Target]:
        return [self.upstream, *self.targets]

    @property
    def gateway(self) -> Target | None:
        return next((t for t in self.targets if t.spawned is not None), None)

    def wrk(self, scenario: str, target: Target, body: bytes, connections: int, duration_s: float,
            rate: float | None = None) -> WrkResult:
        result = run_wrk(target.url.rstrip("/") + "/chat/completions", body, {"Authorization": f"Bearer {target.key}"},
                         connections, duration_s, str(self.scratch / "wrk.lua"), cpus=self.args.load_cpus, rate=rate)
        paced = f" (asked {rate:,.0f}/s)" if rate else ""
        log(f"  [{scenario}] {target.name:16} c={connections:<4}{paced} {result.rps:10,.0f} req/s  "
            f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  errors {result.errors}")
        return result

    def warm(self, target: Target, body: bytes) -> None:
        """Unmeasured load once per target and request kind (connections, pools, caches)."""
        if self.args.warmup <= 0 or (target.name, body) in self.warmed:
            return
        self.warmed.add((target.name, body))
        run_wrk(target.url.rstrip("/") + "/chat/completions", body, {"Authorization": f"Bearer {target.key}"},
                32, self.args.warmup, str(self.scratch / "wrk.lua"), cpus=self.args.load_cpus)

    def chat_run(self, scenario: str, target: Target, connections: int, rep: int) -> WrkResult:
        """The plain chat run at ``connections`` (kept: later scenarios reuse the upstream's)."""
        key = ("chat", target.name, connections, rep)
        if key not in self.memo:
            self.warm(target, self.chat)
            self.memo[key] = self.wrk(scenario, target, self.chat, connections, self.args.duration)
        return self.memo[key]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def row(target: Target, **figures: Any) -> dict[str, Any]:
    return {"target": target.name, "role": target.role, **figures}


def result(title: str, about: str, rows: list[dict[str, Any]], notes: list[str] | None = None) -> dict[str, Any]:
    return {"title": title, "about": about, "rows": rows, "notes": notes or []}


# -- scenarios ----------------------------------------------------------------


def scenario_latency(ctx: Ctx) -> dict[str, Any]:
    rows = [row(t, **ctx.chat_run("latency", t, 1, rep).as_dict())
            for rep in range(ctx.args.repeat) for t in ctx.endpoints]
    rows = reporting.aggregate(rows, ("connections",))
    reporting.compare(rows, ("connections",), ratios=("rps",), added=("p50_ms", "p90_ms", "p99_ms", "p99.9_ms"))
    return result("added latency at concurrency 1",
                  f"wrk, one connection, {ctx.args.duration:g} s per run: non-streaming chat, each target "
                  "against the direct upstream.", rows)


def scenario_throughput(ctx: Ctx) -> dict[str, Any]:
    rows = [row(t, **ctx.chat_run("throughput", t, c, rep).as_dict())
            for c in ctx.args.connection_counts for rep in range(ctx.args.repeat) for t in ctx.endpoints]
    rows = reporting.aggregate(rows, ("connections",))
    reporting.compare(rows, ("connections",), ratios=("rps", "p99_ms"), added=("p50_ms", "p99_ms"))
    counts = ", ".join(map(str, ctx.args.connection_counts))
    return result("throughput and tail latency", f"wrk, one thread, c={counts}, {ctx.args.duration:g} s per run.",
                  rows)


def keeping_up(duration_s: float) -> float:
    """The share of a paced rate a target must achieve to count as keeping up: 95%, 90% in
    runs under 3 s (where starting the connections is a visible part of the run)."""
    return 0.95 if duration_s >= 3 else 0.9


def find_max_rate(ctx: Ctx, target: Target, rep: int) -> dict[str, Any]:
    """Bisection over paced rates in (0, 1.1 x the closed-loop c=32 rate]."""
    a = ctx.args
    hint = ctx.memo.get(("chat", target.name, 32, rep))
    if hint is None:
        ctx.warm(target, ctx.chat)
        hint = ctx.wrk("maxrate", target, ctx.chat, 32, 1)
    low, high = 0.0, max(hint.rps, 10.0) * 1.1
    best: WrkResult | None = None
    trials = []
    keeps_up = keeping_up(a.maxrate_step_s)
    for _ in range(a.maxrate_steps):
        rate = (low + high) / 2
        r = ctx.wrk("maxrate", target, ctx.chat, paced_connections(rate, a.p99_budget_ms), a.maxrate_step_s, rate=rate)
        ok = r.errors == 0 and r.rps >= keeps_up * rate and r.p99_ms < a.p99_budget_ms
        trials.append({"rate": round(rate, 1), "rps": round(r.rps, 1), "p99_ms": r.p99_ms, "ok": ok})
        if ok:
            low, best = rate, r
        else:
            high = rate
    figures: dict[str, Any] = {"max_rate": low, "steps": len(trials), "trials": trials}
    if best is not None:
        d = best.as_dict()
        figures.update({k: d[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms")})
    return figures


def scenario_maxrate(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    rows = [row(t, **find_max_rate(ctx, t, rep)) for rep in range(a.repeat) for t in ctx.endpoints]
    notes = []
    for r in rows:
        if not r["max_rate"]:
            lowest = min(r["trials"], key=lambda trial: trial["rate"])
            notes.append(f"{r['target']}: no rate passed; the lowest tried, {lowest['rate']:,.0f} req/s, had p99 "
                         f"{lowest['p99_ms']:.1f} ms at {lowest['rps']:,.0f} req/s achieved")
    rows = reporting.aggregate(rows)
    reporting.compare(rows, (), ratios=("max_rate",), added=())
    return result(
        f"the highest request rate with p99 under {a.p99_budget_ms:g} ms",
        f"wrk paced by a Lua delay() schedule; a rate passes when wrk achieves "
        f"{keeping_up(a.maxrate_step_s):.0%} of it with no errors "
        f"and p99 < {a.p99_budget_ms:g} ms; {a.maxrate_steps} bisection steps of {a.maxrate_step_s:g} s "
        "over (0, 1.1 x the c=32 rate]. Percentiles are those of the highest passing rate.",
        rows, notes)


def scenario_stream(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    long_body = chat_body(True, model=f"{MODEL}@words={CHUNK_WORDS}")
    rows = []
    for rep in range(a.repeat):
        for t in ctx.endpoints:
            ctx.warm(t, ctx.stream)
            r = ctx.wrk("stream", t, ctx.stream, 32, a.duration)
            short = stream_timings(t.url, t.key, ctx.stream, a.stream_n, warmup=a.stream_warmup)
            long = stream_timings(t.url, t.key, long_body, max(3, a.stream_n // 5), warmup=3)
            ttft = distribution([s.ttfb_ms for s in short])
            # After the first event, how long each further event takes to arrive.
            chunk_us = statistics.median((s.total_ms - s.ttfb_ms) / max(1, s.events - 1) * 1000 for s in long)
            figures = r.as_dict()
            figures.update({f"ttft_{k}": v for k, v in ttft.items()})
            figures.update(chunk_us=chunk_us, events=statistics.median(s.events for s in short),
                           stream_bytes=statistics.median(s.body_bytes for s in short),
                           long_events=statistics.median(s.events for s in long))
            log(f"  [stream] {t.name:16} TTFT p50 {ttft['p50_ms']:.3f} ms  p99 {ttft['p99_ms']:.3f} ms  "
                f"per chunk {chunk_us:.1f} us")
            rows.append(row(t, **figures))
    rows = reporting.aggregate(rows)
    reporting.compare(rows, (), ratios=("rps",), added=("ttft_p50_ms", "ttft_p99_ms", "chunk_us"))
    return result(
        "streaming",
        f"streamed req/s: wrk at c=32 timing whole streams ({a.duration:g} s). Time to first token: a raw socket, "
        f"c=1, one keep-alive connection, {a.stream_n} streams, from sending the request to the first "
        f"`data:` event. Per-chunk: a {CHUNK_WORDS}-token stream (model `{MODEL}@words={CHUNK_WORDS}`, written "
        "at once by the mock), (end - first event) / (events - 1); the added figure is the gateway's cost "
        "per relayed event.",
        rows)


def scenario_slow_streams(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    rows = []
    notes = []
    for n in a.slow_levels:
        ramp_s = n / a.slow_ramp_per_s
        lasts_s = ramp_s + a.slow_hold_s  # each stream; all are open together for slow_hold_s
        tps = REPLY_WORDS / lasts_s
        body = chat_body(True, model=f"{MODEL}@tps={tps:.6g},words={REPLY_WORDS}")
        for rep in range(a.repeat):
            for t in ctx.endpoints:
                fresh: Spawned | None = None
                pid = t.pid
                if t.spawned is not None:  # a fresh gateway: its idle RSS is that of a new worker
                    fresh = ctx.stack.start_gateway(f"{GATEWAY}-slow", ctx.upstream.url)
                    idle = ctx.stack.settle_idle_rss(fresh, ctx.chat)
                    url, pid = fresh.url, fresh.pid
                else:
                    url = t.url
                    idle = rss_bytes(pid) if pid_alive(pid) else 0
                probe: Callable[[], Any] | None = (lambda p=pid: rss_bytes(p)) if pid_alive(pid) else None
                try:
                    r = slow_streams(url, t.key, body, n, a.slow_ramp_per_s, timeout_s=2 * ramp_s + a.slow_hold_s + 60,
                                     probe=probe)
                finally:
                    if fresh is not None:
                        ctx.stack.stop(fresh)
                full = [s[2] for s in r.samples if s[1] == r.peak_open and s[2]]
                peak_rss = max(full or [s[2] for s in r.samples if s[2]] or [0])
                ttft, loaded = distribution(r.ttfb_ms), distribution(r.ttfb_loaded_ms)
                figures: dict[str, Any] = {
                    "streams": n, "completed": r.completed, "failed": r.failed, "peak_open": r.peak_open,
                    "sustained": r.completed == n and r.peak_open == n, "duration_s": r.duration_s,
                    "stream_s": lasts_s, **{f"ttft_{k}": v for k, v in ttft.items()},
                    "ttft_loaded_p50_ms": loaded["p50_ms"], "ttft_loaded_p99_ms": loaded["p99_ms"],
                }
                if pid is not None and idle:
                    figures.update(idle_rss=idle, peak_rss=peak_rss,
                                   rss_per_stream=max(0, peak_rss - idle) / max(1, r.peak_open))
                log(f"  [slow-streams] {t.name:16} n={n} completed {r.completed} failed {r.failed} "
                    f"peak open {r.peak_open}  TTFT p50 {ttft['p50_ms'] or 0:.2f} ms p99 {ttft['p99_ms'] or 0:.2f} ms"
                    + (f"  RSS {idle / 2**20:.1f} -> {peak_rss / 2**20:.1f} MB" if figures.get("idle_rss") else ""))
                for reason, count in r.failures.most_common(3):
                    notes.append(f"{t.name}, {n} streams, run {rep + 1}: {count} x {reason}")
                if r.peak_open < n and not r.failed:
                    notes.append(f"{t.name}, {n} streams: at most {r.peak_open} were open at once: the streams "
                                 "ended before all had started; is the upstream benchmarks/mock_upstream.py (the "
                                 "fast one, which paces on the model name's @tps= knob)?")
                rows.append(row(t, **figures))
    rows = reporting.aggregate(rows, ("streams",))
    for r in rows:  # sustained in every repetition
        r["sustained"] = all(x["completed"] == r["streams"] == x["peak_open"] for x in r["reps"])
    reporting.compare(rows, ("streams",), ratios=(), added=("ttft_p50_ms", "ttft_p99_ms", "ttft_loaded_p50_ms"))
    about = (f"N streams, each on its own connection, opened at {a.slow_ramp_per_s:g}/s and each lasting ramp + "
             f"{a.slow_hold_s:g} s (the mock paces its {REPLY_WORDS} tokens: model `{MODEL}@tps=...`), so all N are "
             "open together for that long. Sustained: every stream got its first event and its end, and all N were "
             "open at once. TTFT: request sent to the first `data:` event; 'at full load': the streams started "
             "with 90% of the others open. Memory per stream: (RSS with all open - idle RSS) / streams, RSS "
             "summed over the process tree from /proc; the gateway is a fresh process per run.")
    return result("concurrent slow streams on one worker", about, rows, notes)


def scenario_cpu(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    rows, notes = [], []
    for rep in range(a.repeat):
        for t in ctx.endpoints:
            if not pid_alive(t.pid):
                if rep == 0:
                    notes.append(f"{t.name}: no process id (give --target-pid / --upstream-pid), not measured")
                continue
            assert t.pid is not None
            ctx.warm(t, ctx.chat)
            before, woke = cpu_seconds(t.pid), wakeups(t.pid)
            r = ctx.wrk("cpu", t, ctx.chat, paced_connections(a.cpu_rate), a.cpu_duration, rate=a.cpu_rate)
            cpu_s = cpu_seconds(t.pid) - before
            figures = r.as_dict()
            figures.update(cpu_s=cpu_s, cpu_us_per_request=cpu_s / max(1, r.requests) * 1e6,
                           cpu_pct=cpu_s / max(r.duration_s, 1e-9) * 100, rss=rss_bytes(t.pid),
                           wakeups_per_request=(wakeups(t.pid) - woke) / max(1, r.requests))
            rows.append(row(t, **figures))
            if r.rps < keeping_up(a.cpu_duration) * a.cpu_rate:
                notes.append(f"{t.name} (run {rep + 1}): achieved {r.rps:,.0f} of {a.cpu_rate:,.0f} req/s: saturated, "
                             "the CPU per request is that of a full core")
    rows = reporting.aggregate(rows)
    reporting.compare(rows, (), ratios=("cpu_us_per_request",), added=())
    return result(
        "CPU time per request",
        f"wrk paced at {a.cpu_rate:,.0f} req/s for {a.cpu_duration:g} s; CPU = utime + stime of the process "
        "tree from /proc/PID/stat, before and after, divided by the requests wrk counted. Wake-ups: voluntary "
        "context switches of all its threads (each a wait that ended), per request. The upstream row is "
        "the mock alone.", rows, notes)


def scenario_counts(ctx: Ctx) -> dict[str, Any]:
    """A second gateway (and floor) under benchmarks/profiled.py, profiled over a paced run."""
    a = ctx.args
    subjects: list[tuple[str, str, Callable[[list[str]], Spawned]]] = []
    if a.spawn:
        subjects.append((GATEWAY, str(ROOT / "gwcore"),
                         lambda launcher: ctx.stack.start_gateway("gwcore-profiled", ctx.upstream.url,
                                                                  launcher=launcher)))
    if a.minimal:
        subjects.append((MINIMAL, str(ROOT / "benchmarks" / "minimal_proxy.py"),
                         lambda launcher: ctx.stack.start_minimal("minimal-profiled", ctx.upstream.url, launcher)))
    rows, notes = [], []
    if not subjects:
        notes.append("only the processes this suite starts (our gateway, --minimal) are profiled")
    for rep in range(a.repeat):
        for name, own, start in subjects:
            path = ctx.scratch / f"counts-{len(rows)}.prof"
            spawned = start([str(ROOT / "benchmarks" / "profiled.py"), str(path)])
            try:
                t = Target(name, "target", spawned.url, GATEWAY_KEY, spawned.pid)
                url = t.url + "/chat/completions"
                run_wrk(url, ctx.chat, {"Authorization": f"Bearer {t.key}"}, paced_connections(a.counts_rate),
                        max(1.0, a.warmup), str(ctx.scratch / "wrk.lua"), cpus=a.load_cpus, rate=a.counts_rate)
                os.kill(spawned.pid, signal.SIGUSR1)
                r = ctx.wrk("counts", t, ctx.chat, paced_connections(a.counts_rate), a.cpu_duration,
                            rate=a.counts_rate)
                os.kill(spawned.pid, signal.SIGUSR2)
                profiled.wait_for(path)
                figures = r.as_dict()
                figures.update(profiled.counts(path, r.requests, own))
                rows.append(row(t, **figures))
            finally:
                ctx.stack.stop(spawned)
    rows = reporting.aggregate(rows)
    floor = next((r for r in rows if r["target"] == MINIMAL), None)
    for r in rows:
        if floor is not None and r is not floor:
            for f in ("python_calls_per_request", "task_steps_per_request"):
                if floor.get(f):
                    r[f"{f}_vs_floor"] = r[f] / floor[f]
    return result(
        "Python calls and trio task steps per request",
        f"A fresh process of each, under benchmarks/profiled.py (cProfile, switched on by a signal after an "
        f"unmeasured run), wrk paced at {a.counts_rate:,.0f} req/s for {a.cpu_duration:g} s; per request wrk "
        "counted: every call cProfile saw in the main thread (Python functions, C functions and methods, each "
        "resumption of a coroutine), trio task steps, and the calls into the program's own code and into trio. "
        "Counts, unlike times, hardly move with a noisy machine: compare two versions by these. The audit "
        "writer's thread is not profiled.", rows, notes)


def _check_cache_hit(target: Target, body: bytes) -> None:
    headers = {"authorization": f"Bearer {target.key}", "content-type": "application/json"}
    seen = []
    for _ in range(2):
        response = httpx.post(target.url + "/chat/completions", content=body, headers=headers, timeout=30)
        seen.append(response.headers.get("x-gateway-cache"))
    if seen[-1] != "HIT":
        raise BenchError(f"{target.name}: the cache does not hit (x-gateway-cache: {seen}); is cache.enabled set?")


def _two_point(ctx: Ctx, scenario: str, target: Target) -> list[dict[str, Any]]:
    """c=1 and c=32 for ``target``, with the upstream's runs (reused if made already)."""
    rows = []
    for rep in range(ctx.args.repeat):
        for c in (1, 32):
            rows.append(row(ctx.upstream, **ctx.chat_run(scenario, ctx.upstream, c, rep).as_dict()))
            ctx.warm(target, ctx.chat)
            rows.append(row(target, **ctx.wrk(scenario, target, ctx.chat, c, ctx.args.duration).as_dict()))
    rows = reporting.aggregate(rows, ("connections",))
    reporting.compare(rows, ("connections",), ratios=("rps", "p99_ms"), added=("p50_ms", "p99_ms"))
    return rows


def scenario_cache(ctx: Ctx) -> dict[str, Any]:
    if ctx.gateway is None:
        return result("the cache-hit path", "Needs the spawned gateway (--spawn).", [],
                      ["skipped: external targets are not reconfigured; run with --spawn"])
    spawned = ctx.stack.start_gateway(f"{GATEWAY}-cache", ctx.upstream.url,
                                      config={"cache": {"enabled": True, "ttl_s": 3600, "max_entries": 10000}})
    target = Target(f"{GATEWAY}+cache", "target", spawned.url, GATEWAY_KEY, spawned.pid,
                    "the gateway with cache.enabled (memory LRU)", spawned)
    try:
        _check_cache_hit(target, ctx.chat)
        rows = _two_point(ctx, "cache", target)
    finally:
        ctx.stack.stop(spawned)
    return result("the cache-hit path",
                  "The gateway with `cache: {enabled: true}`; the same request every time, so after the first "
                  f"every answer is a hit (checked: `x-gateway-cache: HIT`). wrk at c=1 and c=32, "
                  f"{ctx.args.duration:g} s per run.", rows)


def scenario_full_stack(ctx: Ctx) -> dict[str, Any]:
    if ctx.gateway is None:
        return result("the full pipeline on Redis + Postgres", "Needs the spawned gateway (--spawn).", [],
                      ["skipped: external targets are not reconfigured; run with --spawn"])
    redis_url, database_url = ctx.stack.redis_url(), ctx.stack.postgres_url()
    spawned = ctx.stack.start_gateway(f"{GATEWAY}-full", ctx.upstream.url,
                                      env={"REDIS_URL": redis_url, "DATABASE_URL": database_url})
    target = Target(f"{GATEWAY}+redis+pg", "target", spawned.url, GATEWAY_KEY, spawned.pid,
                    "the gateway with REDIS_URL (rate limits) and DATABASE_URL (keys, audit log)", spawned)
    notes = []
    try:
        preflight(Endpoint(target.name, target.url, target.key), stream=False)
        rows = _two_point(ctx, "full-stack", target)
        time.sleep(1.5)  # the audit writer flushes every 0.5 s
        notes.append(f"audit rows in Postgres after the runs: {_count_audit_rows(database_url)} "
                     f"(requests counted by wrk: {sum(int(x['requests']) for r in rows if r['target'] == target.name for x in r['reps']):,}, "
                     "plus warm-up and checks)")
        notes.append(f"Redis keys after the runs: {ctx.stack.redis.command(b'DBSIZE').decode().lstrip(':')}")
    finally:
        ctx.stack.stop(spawned)
    return result(
        "the full pipeline on Redis + Postgres",
        "Auth, a per-key rate limit in Redis (high enough never to trip: the limiter runs on every request), "
        "and the audit log in PostgreSQL (both throwaway servers on the load CPU, started for this run). "
        f"wrk at c=1 and c=32, {ctx.args.duration:g} s per run.", rows, notes)


def _count_audit_rows(database_url: str) -> int | str:
    try:
        import psycopg

        with psycopg.connect(database_url, connect_timeout=5) as conn:
            found = conn.execute("SELECT count(*) FROM audit_log").fetchone()
        return int(found[0]) if found else 0
    except Exception as exc:  # the figure is informative; the run stands without it
        return f"(could not count: {exc!r})"


RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "maxrate": scenario_maxrate,
    "stream": scenario_stream,
    "slow-streams": scenario_slow_streams,
    "cpu": scenario_cpu,
    "counts": scenario_counts,
    "cache": scenario_cache,
    "full-stack": scenario_full_stack,
}


# -- summary ------------------------------------------------------------------


def summary(ctx: Ctx, scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline figures, one column per endpoint (gateway variants under the gateway's)."""
    a = ctx.args
    items: list[dict[str, Any]] = []

    def column(name: str) -> str:
        return GATEWAY if name.startswith(f"{GATEWAY}+") else name

    def add(figure: str, fmt: str, scenario: str, key: str, where: dict[str, Any] | None = None,
            roles: tuple[str, ...] = ("upstream", "target")) -> None:
        rows = scenarios.get(scenario, {}).get("rows", [])
        values = {column(r["target"]): r.get(key) for r in rows
                  if r["role"] in roles and all(r.get(k) == v for k, v in (where or {}).items())
                  and r.get(key) is not None}
        if values:
            items.append({"figure": figure, "format": fmt, "values": values})

    t = ("target",)
    add("chat p50 ms, c=1", "ms", "latency", "p50_ms")
    add("chat added p50 ms, c=1", "+ms", "latency", "added_p50_ms", roles=t)
    add("chat added p99 ms, c=1", "+ms", "latency", "added_p99_ms", roles=t)
    for c in a.connection_counts:
        add(f"chat req/s, c={c}", "int", "throughput", "rps", {"connections": c})
        add(f"chat req/s vs upstream, c={c}", "x", "throughput", "rps_vs_upstream", {"connections": c}, roles=t)
        add(f"chat p99 ms, c={c}", "ms", "throughput", "p99_ms", {"connections": c})
    add(f"max req/s with p99 < {a.p99_budget_ms:g} ms", "int", "maxrate", "max_rate")
    add("streamed req/s, c=32", "int", "stream", "rps")
    add("streamed req/s vs upstream, c=32", "x", "stream", "rps_vs_upstream", roles=t)
    add("time to first token p50 ms, c=1", "ms", "stream", "ttft_p50_ms")
    add("added time to first token p50 ms, c=1", "+ms", "stream", "added_ttft_p50_ms", roles=t)
    add("added per-chunk us", "+us", "stream", "added_chunk_us", roles=t)
    slow = scenarios.get("slow-streams", {}).get("rows", [])
    if slow:
        best: dict[str, Any] = {}
        for r in slow:
            if r["sustained"]:
                best[r["target"]] = max(best.get(r["target"], 0), r["streams"])
            else:
                best.setdefault(r["target"], 0)
        items.append({"figure": "slow streams sustained (all complete, all open at once)", "format": "int",
                      "values": best})
        top = max(a.slow_levels)
        add(f"slow streams open at once (of {top:,})", "int", "slow-streams", "peak_open", {"streams": top})
        add(f"added TTFT p50 ms with {top:,} streams opening", "+ms", "slow-streams", "added_ttft_loaded_p50_ms",
            {"streams": top}, roles=t)
        add(f"memory per open stream KB ({top:,} streams)", "kb", "slow-streams", "rss_per_stream", {"streams": top},
            roles=t)
        add("idle RSS MB (fresh process)", "mb", "slow-streams", "idle_rss", {"streams": top}, roles=t)
    add(f"CPU us per request at {a.cpu_rate:,.0f} req/s", "us", "cpu", "cpu_us_per_request")
    add(f"wake-ups per request at {a.cpu_rate:,.0f} req/s", "count", "cpu", "wakeups_per_request")
    add("Python calls per request (cProfile)", "count", "counts", "python_calls_per_request", roles=t)
    add("trio task steps per request", "count", "counts", "task_steps_per_request", roles=t)
    add("cache on: req/s, c=32", "int", "cache", "rps", {"connections": 32}, roles=t)
    add("cache on: added p50 ms, c=1", "+ms", "cache", "added_p50_ms", {"connections": 1}, roles=t)
    add("Redis + Postgres: req/s, c=32", "int", "full-stack", "rps", {"connections": 32}, roles=t)
    add("Redis + Postgres: p99 ms, c=32", "ms", "full-stack", "p99_ms", {"connections": 32}, roles=t)
    add("Redis + Postgres: added p50 ms, c=1", "+ms", "full-stack", "added_p50_ms", {"connections": 1}, roles=t)
    return items


def count_errors(scenarios: dict[str, dict[str, Any]]) -> list[str]:
    found = []
    for name, res in scenarios.items():
        for r in res["rows"]:
            bad = int(r.get("errors") or 0) + int(r.get("failed") or 0)
            if bad:
                found.append(f"{name}: {r['target']}" + (f" c={r['connections']}" if "connections" in r else "")
                             + (f" n={r['streams']}" if "streams" in r else "") + f": {bad} errors")
    return found


# -- command line -------------------------------------------------------------


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to measure")
    g.add_argument("--target", action="append", default=[],
                   help="base URL of a gateway to measure (repeatable or comma-separated), e.g. http://127.0.0.1:4000/v1")
    g.add_argument("--key", action="append", default=[],
                   help="bearer key per --target, in order (one key for all is fine)")
    g.add_argument("--name", action="append", default=[], help="label per --target, in order")
    g.add_argument("--target-pid", action="append", default=[], help="process id per --target (cpu, memory)")
    g.add_argument("--upstream", help="base URL of the mock upstream the targets use (required with --target)")
    g.add_argument("--upstream-key", default=UPSTREAM_KEY, help="bearer key for the upstream (default %(default)s)")
    g.add_argument("--upstream-pid", type=int, help="process id of --upstream (cpu, memory)")
    g.add_argument("--spawn", action="store_true",
                   help="start our gateway too (the default when no --target is given)")
    g.add_argument("--minimal", action="store_true",
                   help="also measure benchmarks/minimal_proxy.py (trio + h11, no logic), pinned like the gateway")
    g.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, default all: " + ", ".join(SCENARIOS))
    r = p.add_argument_group("how")
    r.add_argument("--quick", action="store_true", help="a smoke run: every scenario, tiny durations, one repetition")
    r.add_argument("--repeat", type=int, default=3, help="repetitions; figures are medians (default %(default)s)")
    r.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default %(default)s)")
    r.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load per target and kind (default %(default)s)")
    r.add_argument("--connections", default="32,256", help="throughput connection counts (default %(default)s)")
    r.add_argument("--p99-budget-ms", type=float, default=5.0, help="maxrate: the p99 to stay under (default %(default)s)")
    r.add_argument("--maxrate-steps", type=int, default=7, help="maxrate: bisection steps (default %(default)s)")
    r.add_argument("--maxrate-step-s", type=float, default=3.0, help="maxrate: seconds per step (default %(default)s)")
    r.add_argument("--stream-n", type=int, default=500, help="stream: requests timed at c=1 (default %(default)s)")
    r.add_argument("--slow-streams", default="2000", help="slow-streams: stream counts, comma-separated (default %(default)s)")
    r.add_argument("--slow-ramp-per-s", type=float, default=200.0, help="slow-streams: new streams per second (default %(default)s)")
    r.add_argument("--slow-hold-s", type=float, default=10.0, help="slow-streams: seconds all are open together (default %(default)s)")
    r.add_argument("--cpu-rate", type=float, default=1000.0, help="cpu: paced req/s (default %(default)s)")
    r.add_argument("--cpu-duration", type=float, default=10.0, help="cpu, counts: seconds (default %(default)s)")
    r.add_argument("--counts-rate", type=float, default=500.0,
                   help="counts: paced req/s, low enough for a profiled process (default %(default)s)")
    s = p.add_argument_group("processes")
    s.add_argument("--gateway-cpus", default="0", help="taskset CPU list for the spawned gateway (default %(default)s)")
    s.add_argument("--load-cpus", default="1", help="CPU list for wrk, this driver, the mock, Redis, Postgres (default %(default)s)")
    s.add_argument("--no-pin", action="store_true", help="do not pin anything")
    s.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gwcore serve` (repeatable)")
    s.add_argument("--gateway-env", action="append", default=[], help="NAME=VALUE for the spawned gateway (repeatable)")
    s.add_argument("--mock-arg", action="append", default=[], help="extra argument for the spawned mock upstream")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="report directory (default benchmarks/results/<time>)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)

    args.scenario_list = _split([args.scenarios])
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    args.targets, args.keys, args.names = _split(args.target), _split(args.key), _split(args.name)
    try:
        args.target_pids = [int(x) for x in _split(args.target_pid)]
    except ValueError:
        p.error("--target-pid wants process ids")
    if args.targets and not args.upstream:
        p.error("--target needs --upstream: the mock upstream the targets use (figures are relative to it)")
    if len(args.keys) not in (0, 1, len(args.targets)) and args.targets:
        p.error("give one --key for all targets or one per target")
    if args.names and len(args.names) != len(args.targets):
        p.error("give one --name per --target")
    args.spawn = args.spawn or not args.targets
    if args.quick:
        args.repeat, args.duration, args.warmup = 1, 1.0, 0.0
        args.maxrate_steps, args.maxrate_step_s = 3, 1.0
        args.stream_n, args.stream_warmup = 20, 3
        args.slow_streams, args.slow_ramp_per_s, args.slow_hold_s = "50", 100.0, 2.0
        args.cpu_rate, args.cpu_duration, args.counts_rate = 200.0, 1.0, 100.0
    else:
        args.stream_warmup = 20
    try:
        args.connection_counts = [int(c) for c in _split([args.connections])]
        args.slow_levels = [int(c) for c in _split([args.slow_streams])]
    except ValueError:
        p.error("--connections and --slow-streams want comma-separated integers")
    if args.repeat < 1 or not args.connection_counts or not args.slow_levels:
        p.error("--repeat, --connections and --slow-streams need at least one")
    if args.no_pin or not can_pin():
        args.gateway_cpus = args.load_cpus = None
    args.gateway_env_map = {}
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--gateway-env wants NAME=VALUE, got {item!r}")
        args.gateway_env_map[name] = value
    return args


def stream_answer(upstream: Target) -> dict[str, int]:
    """What one streamed answer of the upstream is: SSE events and bytes (without chunk framing)."""
    response = httpx.post(upstream.url + "/chat/completions", content=chat_body(True), timeout=30,
                          headers={"authorization": f"Bearer {upstream.key}", "content-type": "application/json"})
    return {"stream_events": response.content.count(b"data:"), "stream_bytes": len(response.content)}


def environment(args: argparse.Namespace, nofile: tuple[int, int]) -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        wrk_version = subprocess.run([require_wrk(), "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        wrk_version = "?"
    pinning = ("none" if args.gateway_cpus is None else
               f"gateway on CPU {args.gateway_cpus}; mock upstream, wrk, this driver, Redis, Postgres on CPU "
               f"{args.load_cpus}")
    return {"cpu_model": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "pinning": pinning, "wrk": wrk_version.strip(),
            "nofile_limit": nofile[0], "gateway_version": gateway_version() if args.spawn else None}


def run(args: argparse.Namespace) -> int:
    require_wrk()
    nofile = raise_nofile_limit()
    if args.load_cpus is not None:
        os.sched_setaffinity(0, cpu_set(args.load_cpus))  # children (mock, Redis, Postgres) inherit it
    started = dt.datetime.now()
    out = args.out or RESULTS / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if out.parent == RESULTS and not (RESULTS / ".gitignore").exists():
        (RESULTS / ".gitignore").write_text("# Benchmark reports: local figures, never committed.\n*\n")
    need = max(args.slow_levels) * 2 + 1024 if "slow-streams" in args.scenario_list else 0
    if nofile[0] < need:
        log(f"note: the open-file limit is {nofile[0]}; {max(args.slow_levels)} slow streams need about {need}")

    stack = Stack(args.gateway_cpus, args.load_cpus, args.gateway_arg, args.gateway_env_map)
    try:
        if "full-stack" in args.scenario_list and args.spawn:
            stack.start_postgres_soon()  # initdb takes seconds: in the background meanwhile
        if args.upstream:
            upstream = Target("upstream", "upstream", args.upstream.rstrip("/"), args.upstream_key, args.upstream_pid,
                              "the direct upstream")
        else:
            mock = stack.start_mock("mock", args.mock_arg)
            upstream = Target("upstream", "upstream", mock.url, args.upstream_key, mock.pid,
                              "the mock upstream alone (benchmarks/mock_upstream.py, fast)", None)
        targets: list[Target] = []
        for i, url in enumerate(args.targets):
            key = args.keys[i] if len(args.keys) > 1 else (args.keys[0] if args.keys else GATEWAY_KEY)
            name = args.names[i] if args.names else f"target{i + 1}"
            pid = args.target_pids[i] if i < len(args.target_pids) else None
            targets.append(Target(name, "target", url.rstrip("/"), key, pid, "given with --target"))
        if args.spawn:
            gw = stack.start_gateway(GATEWAY, upstream.url)
            stack.settle_idle_rss(gw, chat_body(False))
            targets.insert(0, Target(GATEWAY, "target", gw.url, GATEWAY_KEY, gw.pid,
                                     "`gwcore serve`, one worker: auth, a rate limit, accounting (SQLite), access log",
                                     gw))
        if args.minimal:
            floor = stack.start_minimal(MINIMAL, upstream.url)
            targets.append(Target(MINIMAL, "target", floor.url, GATEWAY_KEY, floor.pid,
                                  "benchmarks/minimal_proxy.py: trio + h11 both sides, a keep-alive "
                                  "pool, no logic (the floor)"))
        ctx = Ctx(args, stack, upstream, targets)
        for t in ctx.endpoints:
            for stream in (False, True):
                preflight(Endpoint(t.name, t.url, t.key), stream)
        ctx.stream_answer = stream_answer(upstream)
        scenarios: dict[str, dict[str, Any]] = {}
        for name in args.scenario_list:
            log(f"[{name}]")
            began = time.monotonic()
            scenarios[name] = RUNNERS[name](ctx)
            scenarios[name]["seconds"] = round(time.monotonic() - began, 1)
        ctx_report = ctx
    finally:
        stack.close()

    rep: dict[str, Any] = {
        "schema": "gwcore-bench/1",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "quick": args.quick,
        "repeat": args.repeat,
        "duration_s": args.duration,
        "environment": environment(args, nofile),
        "request": {"bytes": len(chat_body(False)), "model": MODEL, **ctx_report.stream_answer},
        "endpoints": [{"name": t.name, "role": t.role, "url": t.url, "about": t.about} for t in ctx_report.endpoints],
        "summary": summary(ctx_report, scenarios),
        "scenarios": scenarios,
        "plot": None,
    }
    if not args.no_plot and reporting.plot(rep, out / "latency.png"):
        rep["plot"] = "latency.png"
    reporting.write_json(rep, out / "report.json")
    text = reporting.markdown(rep)
    (out / "report.md").write_text(text + "\n")
    print(text)
    log(f"report: {out / 'report.md'}, {out / 'report.json'}" + (f", {out / 'latency.png'}" if rep["plot"] else ""))
    errors = count_errors(scenarios)
    for line in errors:
        log(f"errors: {line}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        log(f"benchmarks: {exc}")
        return 2
    except KeyboardInterrupt:
        log("benchmarks: interrupted")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
