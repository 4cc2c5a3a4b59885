#!/usr/bin/env python3
"""Time to first token of a translated stream: through the gateway vs. straight from
the mock upstream, for each provider.

    python benchmarks/translated.py [--n 300] [--json PATH]

Starts three mock upstreams (OpenAI, Anthropic, Gemini; pinned to CPU 1) and the
gateway (pinned to CPU 0) with one route per provider, then measures, on one
keep-alive connection at c=1 with a raw socket, the time from sending a streaming
request to the first byte of the first SSE event:

- direct: the provider's own streaming request to its mock (Anthropic
  ``/v1/messages``, Gemini ``:streamGenerateContent?alt=sse``, OpenAI chat);
- gateway: an OpenAI ``/v1/chat/completions`` stream for the route, which the gateway
  translates (Anthropic, Gemini) or passes through (OpenAI).

The added time is the gateway's cost for the first token, translation included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load import (BenchError, _Child, _start, can_pin, free_port, measure_ttfb_raw,  # noqa: E402
                  stop, wait_healthy)

KEY = "gw-bench-key"
PROMPT = [{"role": "user", "content": "Write one sentence about the sea, please."}]
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest",
          "google": "gemini-2.0-flash"}


def direct_request(provider: str) -> tuple[str, dict[str, str], bytes]:
    if provider == "anthropic":
        body = {"model": MODELS[provider], "max_tokens": 256, "messages": PROMPT, "stream": True}
        return "/v1/messages", {"x-api-key": "sk-a", "anthropic-version": "2023-06-01"}, \
            json.dumps(body).encode()
    if provider == "google":
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT[0]["content"]}]}]}
        return (f"/v1beta/models/{MODELS[provider]}:streamGenerateContent?alt=sse",
                {"x-goog-api-key": "g-key"}, json.dumps(body).encode())
    body = {"model": MODELS[provider], "messages": PROMPT, "stream": True}
    return "/v1/chat/completions", {"Authorization": "Bearer sk-o"}, json.dumps(body).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="requests per measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    pin = can_pin()
    py = sys.executable
    children: list[_Child] = []
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            mocks = {}
            for provider in MODELS:
                port = free_port()
                cmd = [py, str(ROOT / "benchmarks" / "mock_upstream.py"), "--port", str(port),
                       "--provider", provider]
                child = _start(f"mock-{provider}", (["taskset", "-c", "1"] if pin else []) + cmd,
                               env, Path(scratch), children)
                wait_healthy(child, f"http://127.0.0.1:{port}")
                mocks[provider] = f"http://127.0.0.1:{port}"
            cfg = Path(scratch) / "gateway.yaml"
            cfg.write_text("models:\n" + "".join(
                f"  - name: via-{p}\n    deployments: [{{provider: {p}, model: {MODELS[p]}, "
                f"base_url: '{mocks[p]}{'/v1' if p == 'openai' else ''}', api_key: k-123456}}]\n"
                for p in MODELS))
            port = free_port()
            gw_env = {**env, "GATEWAY_API_KEYS": KEY, "GATEWAY_CONFIG": str(cfg),
                      "RATE_LIMIT_REQUESTS": "1000000000", "RATE_LIMIT_WINDOW": "1"}
            gw = _start("gateway", (["taskset", "-c", "0"] if pin else [])
                        + [py, "-m", "gwcore", "serve", "--port", str(port)], gw_env,
                        Path(scratch), children)
            gateway = f"http://127.0.0.1:{port}"
            wait_healthy(gw, gateway)
            for provider in MODELS:
                path, headers, body = direct_request(provider)
                direct = measure_ttfb_raw(f"{provider} direct", mocks[provider], path, headers,
                                          body, args.n)
                via = measure_ttfb_raw(
                    f"{provider} via gateway", gateway, "/v1/chat/completions",
                    {"Authorization": f"Bearer {KEY}"},
                    json.dumps({"model": f"via-{provider}", "messages": PROMPT,
                                "stream": True}).encode(), args.n)
                rows.append({"provider": provider, "direct_p50_ms": direct.p50_ms,
                             "direct_p99_ms": direct.p99_ms, "gateway_p50_ms": via.p50_ms,
                             "gateway_p99_ms": via.p99_ms,
                             "added_p50_ms": via.p50_ms - direct.p50_ms})
        except BenchError as exc:
            print(f"translated.py: {exc}", file=sys.stderr)
            return 2
        finally:
            for child in reversed(children):
                stop(child)
    print(f"## Time to first SSE event, c=1, {args.n} requests each"
          + ("" if pin else " (not pinned: taskset unavailable)"))
    print()
    print("| upstream | direct p50 ms | direct p99 ms | via gateway p50 ms | via gateway p99 ms | added p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mode = "passthrough" if r["provider"] == "openai" else "translated"
        print(f"| {r['provider']} ({mode}) | {r['direct_p50_ms']:.3f} | {r['direct_p99_ms']:.3f} | "
              f"{r['gateway_p50_ms']:.3f} | {r['gateway_p99_ms']:.3f} | +{r['added_p50_ms']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
