#!/usr/bin/env python3
"""Soak: mixed traffic against a gateway subprocess for a long while, watching its memory
and file descriptors; they must be flat after the warm-up.

    python benchmarks/soak.py [--duration 600] [--interval 30] [--concurrency 8]
        [--warmup S] [--max-rss-growth-mb 16] [--fd-slack 6] [--json PATH]

Spawns, in a scratch working directory (the gateway's SQLite file, spool and log go
there): the mock OpenAI upstream (``benchmarks/mock_upstream.py``, streams paced so a
client can hang up in the middle), a faulty upstream answering 500
(``tests/support/faulty_upstream.py``) and the gateway (``python -m gwcore serve``,
defaults but for a config with the routes below, the response cache on and limits out
of the way).  ``--concurrency`` clients then loop over this mix until ``--duration``:

    kind          share  request                                    expected
    chat            28%  non-streaming, a new prompt                200 MISS
    cached          15%  non-streaming, one of 20 prompts           200 (HIT once warm)
    stream          25%  streaming, a new prompt                    200 ... [DONE]
    disconnect       8%  streaming, the client hangs up after the   (the gateway cancels
                         first chunk                                 the upstream call)
    bad-json         5%  a body that is not JSON                    400
    unknown-model    5%  a model nobody routes (1,000 names)        404
    upstream-500     6%  a route whose upstream answers 500         500/502, after a retry
    refused          4%  a route whose upstream port is closed      503
    bad-key          4%  a key the gateway does not know            401

Every ``--interval`` seconds one line: elapsed time, requests so far and the rate, the
gateway's RSS (``/proc/PID/status``) and open fds (``/proc/PID/fd``), and answers that
did not match their kind.  At the end (traffic stopped, 3 s to settle) a summary table
and a verdict: flat when the RSS grew less than ``--max-rss-growth-mb`` from the first
sample after ``--warmup`` (default: a fifth of the run, at most 60 s) to the last one,
the fds after the run are no more than that first post-warm-up sample's plus
``--fd-slack`` (the pools' idle keep-alive connections are part of the baseline), and
no answer was unexpected.  Exit status 0 when flat, 1 if not, 2 if it could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
MOCK_UPSTREAM = REPO / "benchmarks" / "mock_upstream.py"
KEY = "gw-soak-key-000001"
# (kind, weight): see the table in the docstring.
MIX = (("chat", 28), ("cached", 15), ("stream", 25), ("disconnect", 8), ("bad-json", 5),
       ("unknown-model", 5), ("upstream-500", 6), ("refused", 4), ("bad-key", 4))
EXPECTED = {"chat": {200}, "cached": {200}, "stream": {200}, "disconnect": {200},
            "bad-json": {400}, "unknown-model": {404}, "upstream-500": {500, 502},
            "refused": {503}, "bad-key": {401}}
SETTLE_S = 3.0


class SoakError(Exception):
    pass


@dataclass
class Sample:
    elapsed_s: float
    requests: int
    rate: float
    rss_mb: float
    fds: int
    unexpected: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise SoakError("no VmRSS in /proc")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- processes -------------------------------------------------------------------------


def start_printing(cmd: list[str], prefix: str, cwd: Path, env: dict[str, str],
                   log: Path) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints ``<prefix>URL`` once listening; returns it and the URL."""
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, cwd=cwd,
                            env=env, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(prefix):
        proc.kill()
        raise SoakError(f"{cmd[1]} did not start: {line!r}\n{log.read_text()[-2000:]}")
    return proc, line[len(prefix):].strip()


def wait_healthy(proc: subprocess.Popen, origin: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SoakError(f"the gateway exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(origin + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SoakError(f"the gateway did not become healthy:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_config(mock: str, faulty: str, refused_port: int) -> str:
    return f"""
models:
  - name: soak-chat
    deployments: [{{provider: openai, model: gpt-4o-mini, base_url: "{mock}", api_key: sk-soak}}]
  - name: soak-upstream-500
    retries: 1
    failure_threshold: 1000000     # keep trying it: the errors are the point
    deployments: [{{provider: openai, model: gpt-4o-mini, base_url: "{faulty}", api_key: sk-soak}}]
  - name: soak-refused
    retries: 0
    connect_timeout_s: 1
    failure_threshold: 1000000
    deployments: [{{provider: openai, model: gpt-4o-mini, base_url: "http://127.0.0.1:{refused_port}/v1", api_key: sk-soak}}]
limits:
  default: {{requests: 1000000000, window_s: 1}}
cache: {{enabled: true, ttl_s: 600, max_entries: 1000}}
"""


# -- traffic ---------------------------------------------------------------------------


class Traffic:
    def __init__(self, url: str, concurrency: int, seed: int = 1) -> None:
        self.url = url
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        kinds, weights = zip(*MIX)
        self.kinds, self.weights = list(kinds), list(weights)
        self.requests = 0
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unexpected = 0
        self.unexpected_examples: list[str] = []
        self.serial = 0

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2,
                              max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as h, \
                trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._client, h)

    async def _client(self, h: httpx.AsyncClient) -> None:
        while True:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            self.serial += 1
            try:
                outcome = await self._one(h, kind, self.serial)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            self.requests += 1
            self.outcomes[(kind, outcome)] += 1
            ok = outcome.isdigit() and int(outcome) in EXPECTED[kind]
            if not ok:
                self.unexpected += 1
                if len(self.unexpected_examples) < 10:
                    self.unexpected_examples.append(f"{kind}: {outcome}")

    async def _one(self, h: httpx.AsyncClient, kind: str, n: int) -> str:
        url = self.url + "/v1/chat/completions"
        headers = {"authorization": f"Bearer {KEY}"}
        prompt = f"soak prompt {n}" if kind != "cached" else f"cached prompt {n % 20}"
        body: dict = {"model": "soak-chat", "messages": [{"role": "user", "content": prompt}]}
        if kind == "bad-json":
            r = await h.post(url, headers={**headers, "content-type": "application/json"},
                             content=b'{"model": "soak-chat", "messages": [')
            return str(r.status_code)
        if kind == "unknown-model":
            body["model"] = f"no-such-model-{self.rng.randrange(1000)}"
        elif kind == "upstream-500":
            body["model"] = "soak-upstream-500"
        elif kind == "refused":
            body["model"] = "soak-refused"
        elif kind == "bad-key":
            headers = {"authorization": f"Bearer gw-not-a-key-{n % 50:04d}"}
        if kind in ("stream", "disconnect"):
            body["stream"] = True
            async with h.stream("POST", url, headers=headers, json=body) as r:
                if kind == "disconnect":
                    async for _ in r.aiter_raw():
                        break  # hang up after the first chunk: the connection is dropped
                    return str(r.status_code)
                raw = await r.aread()
            if r.status_code == 200 and not raw.rstrip().endswith(b"data: [DONE]"):
                return "200-without-[DONE]"
            return str(r.status_code)
        r = await h.post(url, headers=headers, json=body)
        return str(r.status_code)


# -- the run ---------------------------------------------------------------------------


async def soak(url: str, pid: int, args: argparse.Namespace) -> tuple[list[Sample], Traffic,
                                                                       int, float, int]:
    traffic = Traffic(url, args.concurrency)
    samples: list[Sample] = []
    start_fds, start_rss = open_fds(pid), rss_mb(pid)
    print(f"gateway pid {pid}: before traffic RSS {start_rss:.1f} MB, {start_fds} fds", flush=True)
    print(f"{'elapsed':>8} {'requests':>9} {'req/s':>7} {'RSS MB':>8} {'fds':>5} "
          f"{'unexpected':>10}", flush=True)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(traffic.run)
        last_n, last_t = 0, t0
        while True:
            remaining = args.duration - (trio.current_time() - t0)
            await trio.sleep(max(0.0, min(args.interval, remaining)))
            now = trio.current_time()
            n = traffic.requests
            s = Sample(round(now - t0, 1), n, round((n - last_n) / max(now - last_t, 1e-9), 1),
                       round(rss_mb(pid), 1), open_fds(pid), traffic.unexpected)
            samples.append(s)
            last_n, last_t = n, now
            print(f"{s.elapsed_s:>7.0f}s {s.requests:>9} {s.rate:>7.0f} {s.rss_mb:>8.1f} "
                  f"{s.fds:>5} {s.unexpected:>10}", flush=True)
            if now - t0 >= args.duration - 1e-6:
                break
        nursery.cancel_scope.cancel()
    await trio.sleep(SETTLE_S)
    return samples, traffic, open_fds(pid), rss_mb(pid), start_fds


def verdict(samples: list[Sample], final_fds: int, traffic: Traffic,
            args: argparse.Namespace) -> tuple[bool, list[str]]:
    warm = [s for s in samples if s.elapsed_s >= args.warmup] or samples[-1:]
    first, last = warm[0], samples[-1]
    growth = last.rss_mb - first.rss_mb
    lines = [
        f"RSS after warm-up ({first.elapsed_s:.0f}s) {first.rss_mb:.1f} MB, at the end "
        f"{last.rss_mb:.1f} MB: {growth:+.1f} MB (limit {args.max_rss_growth_mb:g} MB)",
        f"fds after warm-up {first.fds}, after the run {final_fds} "
        f"(limit {first.fds + args.fd_slack})",
        f"unexpected answers: {traffic.unexpected} of {traffic.requests}"
        + (f" (e.g. {', '.join(traffic.unexpected_examples[:5])})"
           if traffic.unexpected else ""),
    ]
    flat = growth < args.max_rss_growth_mb and final_fds <= first.fds + args.fd_slack \
        and traffic.unexpected == 0
    return flat, lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--concurrency", type=int, default=8, help="clients in parallel")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the baseline sample (default: duration/5, max 60)")
    p.add_argument("--max-rss-growth-mb", type=float, default=16.0)
    p.add_argument("--fd-slack", type=int, default=6)
    p.add_argument("--json", type=Path, help="also write the samples and verdict here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in list(env):
        if name.startswith(("GATEWAY_", "OPENAI_", "ANTHROPIC_", "GOOGLE_AI_")) or \
                name in ("REDIS_URL", "DATABASE_URL"):
            del env[name]
    procs: list[subprocess.Popen] = []
    refused: socket.socket | None = None
    with tempfile.TemporaryDirectory(prefix="gw-soak-") as scratch:
        cwd = Path(scratch)
        try:
            mock, mock_url = start_printing(
                [sys.executable, str(MOCK_UPSTREAM), "--port", "0", "--tokens-per-s", "200",
                 "--reply-words", "30"], "mock upstream listening on ", cwd, env,
                cwd / "mock.log")
            procs.append(mock)
            faulty, faulty_url = start_printing(
                [sys.executable, "-m", "tests.support.faulty_upstream", "--mode", "status",
                 "--status", "500", "--port", "0"], "faulty upstream listening on ", cwd,
                env, cwd / "faulty.log")
            procs.append(faulty)
            # Bound but never listening: connection refused, and no other process on
            # the machine can take the port and answer in its place.
            refused = socket.socket()
            refused.bind(("127.0.0.1", 0))
            cfg = cwd / "gateway.yaml"
            cfg.write_text(gateway_config(mock_url, faulty_url, refused.getsockname()[1]))
            port = free_port()
            log = cwd / "gateway.log"
            with log.open("wb") as out:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "gwcore", "serve", "--config", str(cfg),
                     "--port", str(port)], cwd=cwd, stdout=out, stderr=out,
                    stdin=subprocess.DEVNULL, env={**env, "GATEWAY_API_KEYS": KEY})
            procs.append(gateway)
            origin = f"http://127.0.0.1:{port}"
            wait_healthy(gateway, origin, log)
            print(f"soak: {args.duration:g} s of mixed traffic, {args.concurrency} clients, "
                  f"a sample every {args.interval:g} s, warm-up {args.warmup:g} s", flush=True)
            samples, traffic, final_fds, final_rss, start_fds = trio.run(
                soak, origin, gateway.pid, args)
            if gateway.poll() is not None:
                raise SoakError(f"the gateway died:\n{log.read_text()[-3000:]}")
        except SoakError as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        finally:
            for proc in reversed(procs):
                stop(proc)
            if refused is not None:
                refused.close()
    flat, lines = verdict(samples, final_fds, traffic, args)
    print()
    print("| elapsed s | requests | req/s | RSS MB | fds |")
    print("|---:|---:|---:|---:|---:|")
    for s in samples:
        print(f"| {s.elapsed_s:.0f} | {s.requests} | {s.rate:.0f} | {s.rss_mb:.1f} | {s.fds} |")
    print(f"| after {SETTLE_S:g} s idle | | | {final_rss:.1f} | {final_fds} |")
    print()
    print("| kind | answer | count |")
    print("|---|---|---:|")
    for (kind, outcome), n in sorted(traffic.outcomes.items()):
        print(f"| {kind} | {outcome} | {n} |")
    print()
    for line in lines:
        print(line)
    print(f"verdict: {'FLAT' if flat else 'NOT FLAT'}")
    if args.json:
        args.json.write_text(json.dumps({
            "samples": [asdict(s) for s in samples], "final_fds": final_fds,
            "final_rss_mb": final_rss, "fds_before_traffic": start_fds,
            "outcomes": {f"{k} {o}": n for (k, o), n in traffic.outcomes.items()},
            "flat": flat, "verdict": lines}, indent=2))
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
