#!/usr/bin/env python3
"""Load driver: a target (the gateway) measured against the direct upstream, with wrk.

    # measure a running gateway against its upstream
    python benchmarks/load.py --target http://127.0.0.1:8080/v1 --upstream http://127.0.0.1:9100/v1 \\
        [--key K] [--duration 10] [--connections 1,32] [--stream] [--json PATH]
    # start the mock upstream and the gateway (pinned to a CPU each), measure, stop both
    python benchmarks/load.py [--spawn] [--stream] ...
    # smoke run: 1-second runs at c=1 and c=8
    python benchmarks/load.py --quick ...

Each run is `wrk --latency` POSTing a ~300-byte chat request to `<url>/chat/completions`
(a Lua script generated into a temporary file); req/s and the latency percentiles
are read from wrk's report. Both URLs get the same runs, and the table gives the
target's req/s as a fraction of the upstream's and its added median latency.
With `--stream`, requests ask for `"stream": true` (wrk times the whole response)
and a separate client measures time to first byte at c=1.

Exit status: 0, 1 if a run saw errors (non-2xx answers or socket errors), 2 if
the benchmark could not run (wrk missing, a process not healthy, a bad answer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
MOCK_UPSTREAM = REPO / "benchmarks" / "mock_upstream.py"
MODEL = "gpt-4o-mini"
REQUEST_BYTES = 300
GATEWAY_KEY = "gw-bench-key"
UPSTREAM_KEY = "sk-bench"
# 15 s: the longest a gateway may take from exec to a 200 on /healthz.
HEALTHY_TIMEOUT_S = 15.0
# wrk's own default (2 s) would count a slow stream as a timeout error.
WRK_TIMEOUT = "30s"
TTFB_WARMUP = 10

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    label: str  # "target" / "upstream"
    url: str  # base URL, ".../v1"
    key: str


@dataclass
class WrkRun:
    label: str
    url: str
    connections: int
    stream: bool
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


@dataclass
class TtfbRun:
    label: str
    url: str
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


# -- the request --------------------------------------------------------------


def chat_body(stream: bool, model: str = MODEL) -> bytes:
    """A chat request of REQUEST_BYTES bytes (the user message is padded to fit)."""

    def build(content: str) -> bytes:
        body: dict[str, object] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant answering a load test."},
                {"role": "user", "content": content},
            ],
        }
        if stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":")).encode()

    # Plain ASCII words: one character of content is one byte of JSON.
    text = "Summarise the trade-offs of running an API gateway in front of language model providers. " * 8
    room = REQUEST_BYTES - len(build(""))
    content = text[: text.rfind(" ", 0, room + 1)]  # whole words, then dots to the exact size
    return build(content + "." * (room - len(content)))


def wrk_script(body: bytes, key: str) -> str:
    text = body.decode()
    if "]==]" in text:  # cannot happen with our body; keeps the long string well formed
        raise BenchError("request body contains the Lua long-string terminator")
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [==[{text}]==]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )


def chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


# -- wrk ----------------------------------------------------------------------


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is required and was not found on PATH (Debian/Ubuntu: apt-get install wrk)")
    return path


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def cpu_set(spec: str) -> set[int]:
    """A taskset-style CPU list ("1", "0-1", "1,3") as a set."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> dict[str, float]:
    """The figures of a `wrk --latency` report."""
    figures: dict[str, float] = {}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    if rps is None or total is None:
        raise BenchError(f"could not read wrk's report:\n{text}")
    figures["rps"] = float(rps.group(1))
    figures["requests"] = int(total.group(1))
    figures["duration_s"] = _ms(total.group(2), total.group(3)) / 1000
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        figures[f"p{pct}_ms"] = _ms(value, unit)
    missing = {"p50_ms", "p75_ms", "p90_ms", "p99_ms"} - figures.keys()
    if missing:
        raise BenchError(f"wrk's report has no latency distribution ({sorted(missing)} missing):\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    figures["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    figures["socket_errors"] = sum(int(g) for g in sockets.groups()) if sockets else 0
    return figures


def run_wrk(
    endpoint: Endpoint, script: Path, connections: int, duration_s: float, stream: bool, threads: int,
    cpus: str | None,
) -> WrkRun:
    cmd = [
        require_wrk(),
        f"-t{max(1, min(threads, connections))}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--timeout", WRK_TIMEOUT,
        "--latency",
        "-s", str(script),
        chat_url(endpoint.url),
    ]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    f = parse_wrk(done.stdout)
    return WrkRun(
        label=endpoint.label,
        url=endpoint.url,
        connections=connections,
        stream=stream,
        duration_s=f["duration_s"],
        rps=f["rps"],
        p50_ms=f["p50_ms"],
        p75_ms=f["p75_ms"],
        p90_ms=f["p90_ms"],
        p99_ms=f["p99_ms"],
        requests=int(f["requests"]),
        non2xx=int(f["non2xx"]),
        socket_errors=int(f["socket_errors"]),
    )


# -- checks and time to first byte -------------------------------------------


def preflight(endpoint: Endpoint, stream: bool) -> None:
    """One request through the same URL, key and body wrk will use: fail early and clearly."""
    headers = {"authorization": f"Bearer {endpoint.key}", "content-type": "application/json"}
    try:
        response = httpx.post(chat_url(endpoint.url), content=chat_body(stream), headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise BenchError(f"{endpoint.label} {endpoint.url}: request failed: {exc!r}") from exc
    if response.status_code != 200:
        raise BenchError(
            f"{endpoint.label} {chat_url(endpoint.url)} answered {response.status_code}: {response.text[:500]}"
        )
    if stream:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise BenchError(f"{endpoint.label}: a stream request got {response.headers.get('content-type')!r}")
        if b"data: [DONE]" not in response.content:
            raise BenchError(f"{endpoint.label}: the stream has no [DONE] event: {response.text[:500]}")
    else:
        try:
            kind = response.json().get("object")
        except ValueError:
            kind = None
        if kind != "chat.completion":
            raise BenchError(f"{endpoint.label}: not a chat.completion: {response.text[:500]}")


def _percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def _response_done(buf: bytes, head_end: int, chunked: bool, length: int | None) -> bool:
    if length is not None:
        return len(buf) - head_end >= length
    if chunked:  # the last chunk (RFC 9112 7.1); an SSE event ends in "\n\n", never in "0\r\n\r\n"
        return buf.endswith(b"0\r\n\r\n") and (len(buf) - 5 == head_end or buf[-7:-5] == b"\r\n")
    return False  # close-delimited: read to EOF


def stream_request(url: str, path: str, headers: dict[str, str],
                   body: bytes) -> tuple[str, int, bytes]:
    """(host, port, the bytes of a streaming JSON POST of ``body`` to ``path`` on
    ``url``'s host, with ``headers``), for ``timed_streams``."""
    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        f"Content-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return host, port, request


def timed_streams(label: str, host: str, port: int, request: bytes, n: int,
                  warmup: int) -> list[tuple[float, float, bytes]]:
    """``request`` sent ``warmup + n`` times, one after another on one keep-alive
    connection (c=1, a raw socket: no client library in the figures); for each of the
    last ``n``: ms to the first SSE event's first bytes, ms to the end, and the body."""
    out: list[tuple[float, float, bytes]] = []
    sock: socket.socket | None = None
    try:
        for i in range(warmup + n):
            if sock is None:
                sock = socket.create_connection((host, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.sendall(request)
            buf, first, head_end = b"", None, -1
            chunked, length, close = False, None, False
            while True:
                data = sock.recv(65536)
                if not data:
                    if head_end >= 0 and not chunked and length is None:
                        close = True
                        break
                    raise BenchError(f"{label}: connection closed mid-response: {buf[:500]!r}")
                buf += data
                if head_end < 0:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    head_end = end + 4
                    head = buf[:end].decode("latin-1").lower()
                    status = head.split(" ", 2)[1] if " " in head else "?"
                    if status != "200":
                        raise BenchError(f"{label}: stream request answered {status}: {buf[:500]!r}")
                    chunked = "transfer-encoding: chunked" in head
                    found = re.search(r"^content-length:\s*(\d+)", head, re.M)
                    length = int(found.group(1)) if found else None
                    close = "connection: close" in head
                if first is None and b"data:" in buf[head_end:]:
                    first = time.perf_counter()
                if _response_done(buf, head_end, chunked, length):
                    break
            ended = time.perf_counter()
            if i >= warmup:
                out.append((((first or ended) - started) * 1000, (ended - started) * 1000,
                            buf[head_end:]))
            if close:
                sock.close()
                sock = None
    except OSError as exc:
        raise BenchError(f"{label}: stream client failed: {exc!r}") from exc
    finally:
        if sock is not None:
            sock.close()
    return out


def measure_ttfb(endpoint: Endpoint, n: int) -> TtfbRun:
    """Time from sending a streaming request to the first body byte of its first SSE event.

    One keep-alive connection, c=1, raw socket: no client library in the figure.
    """
    path = urlsplit(chat_url(endpoint.url)).path
    return measure_ttfb_raw(endpoint.label, endpoint.url, path,
                            {"Authorization": f"Bearer {endpoint.key}"}, chat_body(stream=True), n)


def measure_ttfb_raw(label: str, url: str, path: str, headers: dict[str, str], body: bytes,
                     n: int) -> TtfbRun:
    """``measure_ttfb`` for any streaming POST: ``path`` (with its query) on ``url``'s host."""
    host, port, request = stream_request(url, path, headers, body)
    samples = [first for first, _, _ in timed_streams(label, host, port, request, n, TTFB_WARMUP)]
    return TtfbRun(
        label=label,
        url=url,
        requests=len(samples),
        p50_ms=_percentile(samples, 50),
        p99_ms=_percentile(samples, 99),
        mean_ms=statistics.fmean(samples),
    )


# -- spawning the stack -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self, limit: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-limit:] or "(no output)"


def _start(name: str, cmd: list[str], env: dict[str, str], cwd: Path, children: list[_Child]) -> _Child:
    log = cwd / f"{name.replace(' ', '-')}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    child = _Child(name, proc, log)
    children.append(child)
    return child


def wait_healthy(child: _Child, origin: str, timeout_s: float = HEALTHY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() < deadline:
            code = child.proc.poll()
            if code is not None:
                raise BenchError(
                    f"{child.name} exited with status {code} before becoming healthy.\n"
                    f"command: {' '.join(map(str, child.proc.args))}\n--- its output ---\n{child.output()}"
                )
            try:
                response = http.get(origin + "/healthz")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
    raise BenchError(
        f"{child.name} did not answer 200 on {origin}/healthz within {timeout_s:g} s (last: {last}).\n"
        f"command: {' '.join(map(str, child.proc.args))}\n--- its output ---\n{child.output()}"
    )


def stop(child: _Child) -> None:
    if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGTERM)
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


@contextlib.contextmanager
def spawned_stack(args: argparse.Namespace) -> Iterator[tuple[Endpoint, Endpoint]]:
    """The mock upstream on CPU 1 and the gateway on CPU 0, healthy; both stopped on exit."""
    pin = can_pin()
    if not pin:
        print("note: taskset or a second CPU is missing; processes are not pinned", file=sys.stderr)
    mock_port, gateway_port = free_port(), free_port()
    mock_origin, gateway_origin = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{gateway_port}"
    mock_cmd = [sys.executable, str(MOCK_UPSTREAM), "--host", "127.0.0.1", "--port", str(mock_port)]
    if args.mock_latency_ms:
        mock_cmd += ["--latency-ms", str(args.mock_latency_ms)]
    if args.mock_tokens_per_s:
        mock_cmd += ["--tokens-per-s", str(args.mock_tokens_per_s)]
    if args.mock_reply_words is not None:
        mock_cmd += ["--reply-words", str(args.mock_reply_words)]
    gateway_cmd = [sys.executable, "-m", "gwcore", "serve", "--host", "127.0.0.1", "--port", str(gateway_port)]
    gateway_cmd += args.gateway_arg
    if pin:
        mock_cmd = ["taskset", "-c", "1", *mock_cmd]
        gateway_cmd = ["taskset", "-c", "0", *gateway_cmd]

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    gateway_env = dict(env)
    gateway_env.update(
        OPENAI_API_KEY=UPSTREAM_KEY,
        OPENAI_BASE_URL=mock_origin + "/v1",
        GATEWAY_API_KEYS=args.key,
        # The default per-key limit (1000 per hour) would turn most of a run into 429s.
        RATE_LIMIT_REQUESTS="1000000000",
        RATE_LIMIT_WINDOW="1",
    )
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"--gateway-env wants NAME=VALUE, got {item!r}")
        gateway_env[name] = value

    children: list[_Child] = []
    # A scratch working directory: the gateway reads .env and config/gateway.yaml
    # from its cwd and writes data/gateway.db there; none of the repo's should leak in.
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as scratch:
        try:
            mock = _start("mock upstream", mock_cmd, env, Path(scratch), children)
            wait_healthy(mock, mock_origin)
            gateway = _start("gateway", gateway_cmd, gateway_env, Path(scratch), children)
            wait_healthy(gateway, gateway_origin)
            target = Endpoint("target", gateway_origin + "/v1", args.key)
            yield target, Endpoint("upstream", mock_origin + "/v1", UPSTREAM_KEY)
        finally:
            for child in reversed(children):
                stop(child)


# -- report -------------------------------------------------------------------


def comparisons(runs: list[WrkRun]) -> list[dict[str, float]]:
    by = {(r.label, r.connections): r for r in runs}
    rows = []
    for (label, connections), target in by.items():
        upstream = by.get(("upstream", connections))
        if label != "target" or upstream is None:
            continue
        rows.append(
            {
                "connections": connections,
                "rps_ratio": target.rps / upstream.rps if upstream.rps else 0.0,
                "added_p50_ms": target.p50_ms - upstream.p50_ms,
                "added_p99_ms": target.p99_ms - upstream.p99_ms,
            }
        )
    return rows


def render(
    args: argparse.Namespace, target: Endpoint, upstream: Endpoint, runs: list[WrkRun], ttfb: list[TtfbRun]
) -> str:
    kind = "streaming chat (wrk times the whole stream)" if args.stream else "non-streaming chat"
    lines = [
        f"## Load: {kind}, {args.duration:g} s per run",
        "",
        f"- target: {target.url}",
        f"- upstream: {upstream.url}",
        f"- request: POST /chat/completions, {len(chat_body(args.stream))} bytes, model {MODEL}",
        "",
        "| target | conns | req/s | p50 ms | p90 ms | p99 ms | errors | req/s vs upstream | added p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compared = {row["connections"]: row for row in comparisons(runs)}
    for run in runs:
        row = compared.get(run.connections) if run.label == "target" else None
        ratio = f"{row['rps_ratio']:.2f}" if row else ""
        added = f"{row['added_p50_ms']:+.3f}" if row else ""
        lines.append(
            f"| {run.label} | {run.connections} | {run.rps:,.0f} | {run.p50_ms:.3f} | {run.p90_ms:.3f} "
            f"| {run.p99_ms:.3f} | {run.errors} | {ratio} | {added} |"
        )
    if ttfb:
        lines += [
            "",
            "Time to first byte of the first SSE event, c=1, one keep-alive connection:",
            "",
            "| target | requests | TTFB p50 ms | TTFB p99 ms | added p50 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        base = next((t for t in ttfb if t.label == "upstream"), None)
        for t in ttfb:
            added = f"{t.p50_ms - base.p50_ms:+.3f}" if base is not None and t.label == "target" else ""
            lines.append(f"| {t.label} | {t.requests} | {t.p50_ms:.3f} | {t.p99_ms:.3f} | {added} |")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="base URL of the system under test, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--upstream", help="base URL of the upstream measured directly, e.g. http://127.0.0.1:9100/v1")
    parser.add_argument(
        "--spawn", action="store_true", help="start the mock upstream and the gateway (default without --target)"
    )
    parser.add_argument("--key", default=GATEWAY_KEY, help="bearer key for the target (default %(default)s)")
    parser.add_argument("--upstream-key", default=UPSTREAM_KEY, help="bearer key for the upstream (default %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default %(default)s)")
    parser.add_argument("--connections", default="1,32", help="comma-separated connection counts (default %(default)s)")
    parser.add_argument("--stream", action="store_true", help='"stream": true requests, plus time to first byte')
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default %(default)s)")
    parser.add_argument("--wrk-cpus", help="taskset CPU list for wrk (default: 1 with --spawn, none otherwise)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of unmeasured load per URL first (default %(default)s)"
    )
    parser.add_argument("--ttfb-n", type=int, default=200, help="requests for time to first byte (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write all figures as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="1-second runs at c=1 and c=8, no warm-up (smoke test)")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gwcore serve` (repeatable)")
    parser.add_argument(
        "--gateway-env", action="append", default=[], help="NAME=VALUE for the gateway's environment (repeatable)"
    )
    parser.add_argument("--mock-latency-ms", type=float, default=0.0, help="--spawn: mock upstream latency")
    parser.add_argument("--mock-tokens-per-s", type=float, default=0.0, help="--spawn: mock upstream streaming pace")
    parser.add_argument("--mock-reply-words", type=int, default=None, help="--spawn: mock upstream reply length")
    args = parser.parse_args(argv)
    if args.target and args.spawn:
        parser.error("--spawn starts its own target; do not give --target too")
    if args.target and not args.upstream:
        parser.error("--target needs --upstream: the figures are relative to the direct upstream")
    if args.upstream and not args.target:
        parser.error("--upstream needs --target (or neither, to --spawn)")
    args.spawn = not args.target
    if args.quick:
        args.duration, args.connections, args.warmup = 1.0, "1,8", 0.0
        args.ttfb_n = min(args.ttfb_n, 50)
    try:
        args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections wants comma-separated integers, got {args.connections!r}")
    if not args.connection_counts or min(args.connection_counts) < 1:
        parser.error("--connections needs at least one count >= 1")
    if args.wrk_cpus is None and args.spawn and can_pin():
        args.wrk_cpus = "1"
    return args


def measure(args: argparse.Namespace, target: Endpoint, upstream: Endpoint) -> tuple[list[WrkRun], list[TtfbRun]]:
    endpoints = [upstream, target]
    for endpoint in endpoints:
        preflight(endpoint, args.stream)
    runs: list[WrkRun] = []
    ttfb: list[TtfbRun] = []
    with tempfile.TemporaryDirectory(prefix="gw-load-") as scratch:
        scripts = {}
        for endpoint in endpoints:
            script = Path(scratch) / f"{endpoint.label}.lua"
            script.write_text(wrk_script(chat_body(args.stream), endpoint.key))
            scripts[endpoint.label] = script
        def wrk(endpoint: Endpoint, connections: int, duration_s: float) -> WrkRun:
            script = scripts[endpoint.label]
            return run_wrk(endpoint, script, connections, duration_s, args.stream, args.threads, args.wrk_cpus)

        if args.warmup > 0:
            for endpoint in endpoints:
                wrk(endpoint, max(args.connection_counts), args.warmup)
        for connections in args.connection_counts:
            for endpoint in endpoints:
                run = wrk(endpoint, connections, args.duration)
                print(
                    f"  {endpoint.label:8} c={connections:<4} {run.rps:10,.0f} req/s  p50 {run.p50_ms:.3f} ms"
                    f"  p99 {run.p99_ms:.3f} ms  errors {run.errors}",
                    file=sys.stderr,
                )
                runs.append(run)
    if args.stream:
        for endpoint in endpoints:
            ttfb.append(measure_ttfb(endpoint, args.ttfb_n))
    return runs, ttfb


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_wrk()
        if args.spawn:
            if args.wrk_cpus is not None and can_pin():
                os.sched_setaffinity(0, cpu_set(args.wrk_cpus))  # the TTFB client shares wrk's CPU
            with spawned_stack(args) as (target, upstream):
                upstream = Endpoint("upstream", upstream.url, args.upstream_key)
                runs, ttfb = measure(args, target, upstream)
        else:
            target = Endpoint("target", args.target, args.key)
            upstream = Endpoint("upstream", args.upstream, args.upstream_key)
            runs, ttfb = measure(args, target, upstream)
    except BenchError as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 2
    print(render(args, target, upstream, runs, ttfb))
    if args.json is not None:
        report = {
            "stream": args.stream,
            "duration_s": args.duration,
            "connections": args.connection_counts,
            "target": target.url,
            "upstream": upstream.url,
            "spawned": args.spawn,
            "request_bytes": len(chat_body(args.stream)),
            "runs": [asdict(r) for r in runs],
            "comparison": comparisons(runs),
            "ttfb": [asdict(t) for t in ttfb],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in runs if r.errors or r.requests == 0]
    for run in failed:
        print(
            f"load.py: {run.label} c={run.connections}: {run.requests} requests, {run.non2xx} non-2xx, "
            f"{run.socket_errors} socket errors",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
