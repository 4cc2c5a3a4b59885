"""Load generators for the suite: wrk (closed loop or paced) and two raw-socket stream clients.

- ``run_wrk``: ``wrk`` with a generated Lua script whose ``done()`` prints the figures
  (requests, errors by kind, latency percentiles to p99.9) in a form we parse, instead of
  wrk's human report. With ``rate``, the script paces requests: each ``delay()`` call
  claims the next send slot of a schedule at ``rate`` per second (per wrk thread), so the
  connections send at that rate as long as the target keeps up, and fall behind (the
  achieved rate drops) when it does not. wrk's latency is timed from each request's send,
  so a target that falls behind shows it in the achieved rate, not in the percentiles
  (coordinated omission: compare achieved to asked before reading them).
- ``stream_timings``: one keep-alive connection, c=1, timing the first SSE event and the
  end of each streamed response (``load.timed_streams``, also behind load.py's ``measure_ttfb_raw``).
- ``slow_streams``: thousands of concurrent streams on asyncio (one connection each),
  opened at a steady rate, each timed to its first event and to its end; a callback
  samples the target's memory while they are open.
"""
from __future__ import annotations

import asyncio
import collections
import math
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from benchmarks.load import BenchError, stream_request, timed_streams

# wrk's own default (2 s) would count a slow stream as a timeout error.
WRK_TIMEOUT = "30s"
PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)


def pkey(pct: float) -> str:
    """50.0 -> "p50_ms", 99.9 -> "p99.9_ms"."""
    return f"p{pct:g}_ms"


# -- wrk ----------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    duration_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors_connect: int = 0
    errors_read: int = 0
    errors_write: int = 0
    errors_status: int = 0  # non-2xx/3xx answers
    errors_timeout: int = 0
    rate: float | None = None  # asked (paced runs)
    connections: int = 0

    @property
    def errors(self) -> int:
        return self.errors_connect + self.errors_read + self.errors_write + self.errors_status + self.errors_timeout

    def as_dict(self) -> dict[str, Any]:
        """The figures, percentiles named like ``distribution``'s ("p99.9_ms")."""
        out = asdict(self)
        out["p99.9_ms"] = out.pop("p999_ms")
        out["errors"] = self.errors
        return out


_PACING = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local bench_ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, bench_ts)  -- CLOCK_MONOTONIC
  return tonumber(bench_ts.tv_sec) * 1000 + tonumber(bench_ts.tv_nsec) / 1e6
end
local interval_ms = {interval_ms!r}
local next_at = nil
-- Each call claims the next send slot; wrk's timers have 1 ms granularity, so a slot
-- less than half a millisecond away is sent at once (the average rate still holds).
function delay()
  local now = now_ms()
  if next_at == nil then next_at = now end
  local wait = next_at - now
  next_at = next_at + interval_ms
  if wait < 0.5 then return 0 end
  return math.floor(wait + 0.5)
end
"""

_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests %d duration_us %d connect %d read %d write %d status %d timeout %d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({ 50, 75, 90, 99, 99.9 }) do
    io.write(string.format("BENCH p%s %d\\n", tostring(p), latency:percentile(p)))
  end
  io.write(string.format("BENCH mean %f max %d\\n", latency.mean, latency.max))
end
"""


def wrk_lua(body: bytes, headers: dict[str, str], rate_per_thread: float | None = None) -> str:
    text = body.decode()
    if "]==]" in text:
        raise BenchError("request body contains the Lua long-string terminator")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]", 'wrk.headers["Content-Type"] = "application/json"']
    for name, value in headers.items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    script = "\n".join(lines) + "\n"
    if rate_per_thread:
        script += _PACING.format(interval_ms=1000.0 / rate_per_thread)
    return script + _DONE


def parse_wrk_done(text: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("BENCH "):
            continue
        words = line.split()[1:]
        for name, value in zip(words[::2], words[1::2]):
            figures[name] = float(value)
    needed = {"requests", "duration_us", "p50", "p99", "p99.9", "mean", "max"}
    if not needed <= figures.keys():
        raise BenchError(f"could not read wrk's figures (missing {sorted(needed - figures.keys())}):\n{text}")
    return figures


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is required and was not found on PATH (Debian/Ubuntu: apt-get install wrk)")
    return path


def run_wrk(url: str, body: bytes, headers: dict[str, str], connections: int, duration_s: float,
            script_path: str, cpus: str | None = None, rate: float | None = None, threads: int = 1) -> WrkResult:
    """One wrk run against ``url``; ``rate``: paced (requests per second in total)."""
    threads = max(1, min(threads, connections))
    with open(script_path, "w") as f:
        f.write(wrk_lua(body, headers, rate / threads if rate else None))
    seconds = max(1, round(duration_s))  # wrk takes whole seconds
    cmd = [require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", WRK_TIMEOUT,
           "-s", script_path, url]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    f = parse_wrk_done(done.stdout)
    duration = f["duration_us"] / 1e6
    return WrkResult(
        rps=f["requests"] / duration if duration else 0.0,
        requests=int(f["requests"]),
        duration_s=duration,
        p50_ms=f["p50"] / 1000,
        p75_ms=f["p75"] / 1000,
        p90_ms=f["p90"] / 1000,
        p99_ms=f["p99"] / 1000,
        p999_ms=f["p99.9"] / 1000,
        mean_ms=f["mean"] / 1000,
        max_ms=f["max"] / 1000,
        errors_connect=int(f["connect"]),
        errors_read=int(f["read"]),
        errors_write=int(f["write"]),
        errors_status=int(f["status"]),
        errors_timeout=int(f["timeout"]),
        rate=rate,
        connections=connections,
    )


def paced_connections(rate: float, budget_ms: float = 5.0) -> int:
    """Connections for a paced run: enough for twice the requests in flight at ``budget_ms``
    each (at most 20 ms: more connections than that only cost the target accepts)."""
    return max(4, min(256, math.ceil(rate * min(budget_ms, 20.0) / 1000 * 2)))


# -- percentiles --------------------------------------------------------------


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile (what wrk reports too)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


def distribution(samples_ms: list[float]) -> dict[str, float | None]:
    """Percentiles, mean and max of ``samples_ms``; None for each when there are no samples."""
    if not samples_ms:
        return {**{pkey(p): None for p in PERCENTILES}, "mean_ms": None, "max_ms": None}
    out: dict[str, float | None] = {pkey(p): percentile(samples_ms, p) for p in PERCENTILES}
    out["mean_ms"] = statistics.fmean(samples_ms)
    out["max_ms"] = max(samples_ms)
    return out


# -- one stream at a time -----------------------------------------------------


def _request_bytes(url: str, key: str, body: bytes) -> tuple[str, int, bytes]:
    path = urlsplit(url).path.rstrip("/") + "/chat/completions"
    return stream_request(url, path, {"Authorization": f"Bearer {key}"}, body)


@dataclass
class StreamSample:
    ttfb_ms: float  # request sent -> the first SSE event's first bytes
    total_ms: float  # request sent -> the end of the response
    events: int
    body_bytes: int


def stream_timings(url: str, key: str, body: bytes, n: int, warmup: int = 10) -> list[StreamSample]:
    """``n`` streamed requests, one after another on one keep-alive connection (c=1)."""
    host, port, request = _request_bytes(url, key, body)
    return [StreamSample(ttfb_ms=first, total_ms=total, events=payload.count(b"data:"),
                         body_bytes=len(payload))
            for first, total, payload in timed_streams(url, host, port, request, n, warmup)]


# -- many slow streams at once ------------------------------------------------


@dataclass
class SlowStreamsResult:
    streams: int
    completed: int = 0  # every event and the end of the response arrived
    failed: int = 0  # refused, answered non-200, or cut short
    peak_open: int = 0  # streams open at once (first event seen, end not yet)
    ttfb_ms: list[float] = field(default_factory=list)  # per stream, in start order
    ttfb_loaded_ms: list[float] = field(default_factory=list)  # streams started with >= 90% open
    duration_s: float = 0.0
    samples: list[tuple[float, int, Any]] = field(default_factory=list)  # (t, open, probe())
    failures: collections.Counter[str] = field(default_factory=collections.Counter)  # reason -> streams


class _SlowStream(asyncio.Protocol):
    __slots__ = ("run", "index", "request", "transport", "sent_at", "first_at", "done", "head", "status",
                 "tail", "opened", "saw_done")

    def __init__(self, run: "_SlowRun", index: int, request: bytes) -> None:
        self.run = run
        self.index = index
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.first_at = 0.0
        self.done = False
        self.head = b""
        self.status = b""
        self.tail = b""
        self.opened = False
        self.saw_done = False  # the "data: [DONE]" event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = self.head.split(b" ", 2)[1]
            if self.status != b"200":
                body = self.head[end + 4:end + 304].decode(errors="replace")
                self._fail(f"answered {self.status.decode(errors='replace')}: {body}")
                return
            data = self.head[end + 4:]
            self.head = b""
        window = self.tail + data
        if not self.first_at and b"data:" in window:
            self.first_at = time.perf_counter()
            self.opened = True
            self.run.first_event(self)
        if b"[DONE]" in window:
            self.saw_done = True
        if window.endswith(b"0\r\n\r\n"):  # the last chunk (RFC 9112 7.1)
            if not self.saw_done:
                self._fail("the stream ended without data: [DONE]")
                return
            self.done = True
            self.run.finished(self, ok=True)
            assert self.transport is not None
            self.transport.close()
            return
        self.tail = window[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if self.saw_done and exc is None:  # a close-delimited body ends with the connection
            self.done = True
            self.run.finished(self, ok=True)
            return
        self._fail(f"connection lost before the end ({exc!r})")

    def _fail(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.run.finished(self, ok=False, reason=reason)
        if self.transport is not None:
            self.transport.close()


class _SlowRun:
    def __init__(self, n: int) -> None:
        self.result = SlowStreamsResult(streams=n)
        self.open = 0
        self.pending = n
        self.all_done = asyncio.Event()

    def first_event(self, stream: _SlowStream) -> None:
        r = self.result
        self.open += 1
        r.peak_open = max(r.peak_open, self.open)

    def finished(self, stream: _SlowStream, ok: bool, reason: str = "") -> None:
        r = self.result
        if stream.opened:
            self.open -= 1
        if ok:
            r.completed += 1
        else:
            r.failed += 1
            r.failures[reason] += 1
        self.pending -= 1
        if self.pending == 0:
            self.all_done.set()


async def _slow_streams(url: str, key: str, body: bytes, n: int, ramp_per_s: float, timeout_s: float,
                        probe: Callable[[], Any] | None, probe_every_s: float) -> SlowStreamsResult:
    host, port, request = _request_bytes(url, key, body)
    loop = asyncio.get_running_loop()
    run = _SlowRun(n)
    streams: list[_SlowStream] = []
    started = time.perf_counter()

    async def open_one(i: int) -> None:
        stream = _SlowStream(run, i, request)
        streams.append(stream)
        try:
            await loop.create_connection(lambda: stream, host, port)
        except OSError as exc:
            stream._fail(f"connect failed: {exc!r}")

    async def opener() -> None:
        tasks = []
        for i in range(n):
            due = started + i / ramp_per_s
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(open_one(i)))
        await asyncio.gather(*tasks)

    async def sampler() -> None:
        while not run.all_done.is_set():
            run.result.samples.append((time.perf_counter() - started, run.open, probe() if probe else None))
            try:
                await asyncio.wait_for(run.all_done.wait(), probe_every_s)
            except asyncio.TimeoutError:
                pass

    sampling = asyncio.ensure_future(sampler())
    try:
        await asyncio.wait_for(asyncio.gather(opener(), run.all_done.wait()), timeout_s)
    except asyncio.TimeoutError:
        for stream in streams:
            stream._fail(f"not finished within {timeout_s:g} s")
    finally:
        run.all_done.set()
        await sampling
        for stream in streams:
            if stream.transport is not None:
                stream.transport.close()
        await asyncio.sleep(0)
    r = run.result
    r.duration_s = time.perf_counter() - started
    ordered = sorted(streams, key=lambda s: s.index)
    r.ttfb_ms = [(s.first_at - s.sent_at) * 1000 for s in ordered if s.first_at]
    # "At that load": the streams that started once 90% of the others were already open.
    r.ttfb_loaded_ms = [(s.first_at - s.sent_at) * 1000 for s in ordered if s.first_at and s.index >= 0.9 * n]
    return r


def slow_streams(url: str, key: str, body: bytes, n: int, ramp_per_s: float, timeout_s: float,
                 probe: Callable[[], Any] | None = None, probe_every_s: float = 0.1) -> SlowStreamsResult:
    """``n`` streams opened at ``ramp_per_s`` each on its own connection, held until they end."""
    return asyncio.run(_slow_streams(url, key, body, n, ramp_per_s, timeout_s, probe, probe_every_s))
