#!/usr/bin/env python3
"""Run a mock upstream standalone (the benchmark upstream): OpenAI by default.

    python benchmarks/mock_upstream.py --port 9100 [--provider openai|anthropic|google]
        [--latency-ms X] [--first-byte-ms X] [--tokens-per-s N] [--reply-words N]
        [--impl fast|trio]

Prints one line, `mock upstream listening on http://HOST:PORT/v1`, once it accepts
connections (with `--port 0` that line tells the port it picked), then serves until
SIGTERM or SIGINT. Requests are not recorded (no memory growth under load) unless
`--record` is given.

Two implementations of the same wire format: `fast` (the default for OpenAI:
`benchmarks/fast_upstream.py`, stdlib asyncio, precomputed answers, several times the
rate of the other) and `trio` (`tests/support/mock_*.py`, trio + h11, the mocks the tests
use; the only one for Anthropic and Google, and for `--record`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from tests.support.mock_anthropic import serve_mock_anthropic  # noqa: E402
from tests.support.mock_gemini import serve_mock_gemini  # noqa: E402
from tests.support.mock_openai import DEFAULT_REPLY, serve_mock_openai  # noqa: E402

SERVERS = {"openai": serve_mock_openai, "anthropic": serve_mock_anthropic,
           "google": serve_mock_gemini}


def reply_of(words: int) -> str:
    """A reply of exactly `words` words, cycling through the default reply."""
    base = DEFAULT_REPLY.split()
    return " ".join(base[i % len(base)] for i in range(words))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--provider", choices=sorted(SERVERS), default="openai",
                        help="which API the mock speaks (default openai)")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="extra latency of non-streaming answers")
    parser.add_argument("--first-byte-ms", type=float, default=0.0, help="delay before every response head")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="streaming pace; 0 = as fast as possible")
    parser.add_argument("--reply-words", type=int, default=None, help="reply length in words (default: the 9-word reply)")
    parser.add_argument("--record", action="store_true", help="keep every request in memory (trio only)")
    parser.add_argument("--impl", choices=["fast", "trio"], default=None,
                        help="fast (asyncio; default for openai) or trio (h11; the tests' mocks)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="fast: the event loop (auto: uvloop when installed, else asyncio)")
    args = parser.parse_args(argv)
    if args.impl is None:
        args.impl = "fast" if args.provider == "openai" and not args.record else "trio"
    if args.impl == "fast" and (args.provider != "openai" or args.record):
        parser.error("--impl fast speaks OpenAI only and does not record; use --impl trio")
    return args


async def run(args: argparse.Namespace) -> None:
    knobs = {
        "latency_s": args.latency_ms / 1000,
        "first_byte_delay_s": args.first_byte_ms / 1000,
        "tokens_per_s": args.tokens_per_s,
        "record": args.record,
    }
    if args.reply_words is not None:
        knobs["reply"] = reply_of(args.reply_words)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with SERVERS[args.provider](args.host, args.port, **knobs) as mock:
            print(f"mock upstream listening on {mock.base_url}", flush=True)
            async for signum in signals:
                print(f"mock upstream stopping ({signal.Signals(signum).name})", flush=True)
                return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.impl == "fast":
        from benchmarks.fast_upstream import Knobs
        from benchmarks.fast_upstream import run as run_fast

        knobs = Knobs(latency_s=args.latency_ms / 1000, first_byte_s=args.first_byte_ms / 1000,
                      tokens_per_s=args.tokens_per_s, reply_words=args.reply_words)
        run_fast(args.host, args.port, knobs,
                 lambda url: print(f"mock upstream listening on {url}", flush=True), args.loop)
        return 0
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
