"""Coverage-guided fuzzing (atheris / libFuzzer) of the gateway's parsers: run by hand.

    .venv/bin/pip install atheris                       # 3.0.0 has wheels for 3.11
    .venv/bin/python benchmarks/fuzz/atheris_targets.py TARGET [libFuzzer options]

    TARGET: h1 | sse | cachekey | translators
    e.g.    .venv/bin/python benchmarks/fuzz/atheris_targets.py h1 -max_total_time=300
            .venv/bin/python benchmarks/fuzz/atheris_targets.py sse -max_total_time=60 \\
                -max_len=4096 benchmarks/fuzz/corpus/sse     # a corpus dir is optional
    Set GWNATIVE_PURE=1 to fuzz the pure twins only (the default also compares them with
    the compiled ones, which libFuzzer cannot see into: only Python code is instrumented).

Each target raises (and libFuzzer stops, printing the input and saving it as
``crash-*``) when the code under test breaks its contract:

    h1           gwcore.server.h1: bytes split anywhere raise only ProtocolError with a
                 status the server answers (400, 413, 431, 501, 505), never h11's own
                 errors; a completed request can be answered and the cycle restarted.
    sse          gwnative SSEParser: only SSEError; compiled and pure twins agree call
                 by call; the events do not depend on the chunking.
    cachekey     gwnative cache_key: a key or CacheKeyError, the same in both twins;
                 every JSON object orjson reads (nesting within 128) has a key.
    translators  gwcore.providers: upstream bytes into every parser, stream translator
                 and map_error raise only GatewayErrors; the same bytes as a client
                 request into every request builder raise only InvalidRequest.

Not part of the test suite (tests/hardening runs hypothesis versions of the same
properties in CI); a crash found here becomes a regression test there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    import orjson

    from gwcore.config import Deployment
    from gwcore.errors import GatewayError, InvalidRequest
    from gwcore.providers import anthropic, google, openai
    from gwcore.server.h1 import (CLOSED, END_OF_BODY, NEED_DATA, PAUSED, H1Connection,
                                  ProtocolError, RequestHead)
    from gwnative import _cachekey_py, _sse_py
    from gwnative.errors import CacheKeyError, SSEError

PURE = bool(os.environ.get("GWNATIVE_PURE"))
if PURE:
    _sse_c, _cachekey_c = _sse_py, _cachekey_py
else:
    from gwnative import _cachekey_c, _sse_c


def _pieces(fdp: atheris.FuzzedDataProvider, data: bytes) -> list[bytes]:
    """``data`` cut at fuzzer-chosen points (no empty pieces: to h11, b"" is EOF)."""
    cuts = sorted({fdp.ConsumeIntInRange(0, len(data)) for _ in range(fdp.ConsumeIntInRange(0, 8))})
    return [p for p in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])) if p]


# -- h1 -----------------------------------------------------------------------------------

def h1_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    conn = H1Connection(max_header_bytes=fdp.ConsumeIntInRange(32, 2048),
                        max_body_bytes=fdp.ConsumeIntInRange(0, 4096))
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    pieces = _pieces(atheris.FuzzedDataProvider(raw[:16]), raw) + [b""]  # b"": EOF
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                if event is PAUSED:
                    conn.response(200, [], b"ok")
                    if not conn.start_next_cycle():
                        return
                elif event is END_OF_BODY:
                    conn.response(200, [], b"ok")
                    if not conn.start_next_cycle():
                        return
                elif not isinstance(event, RequestHead) and not hasattr(event, "data"):
                    raise AssertionError(f"unexpected event {event!r}")
    except ProtocolError as exc:
        assert exc.status in (400, 413, 431, 501, 505), exc.status
        conn.error_response(exc.status, [], b"{}")


# -- sse ----------------------------------------------------------------------------------

def _run_sse(impl, pieces: list[bytes], limit: int) -> list:
    parser = impl.SSEParser(max_event_bytes=limit)
    out: list = []
    for piece in pieces:
        try:
            out.append([e.astuple() for e in parser.feed(piece)])
        except SSEError:
            out.append("SSEError")
    parser.close()
    out.append(parser.truncated)
    return out


def sse_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.ConsumeIntInRange(1, 256)
    stream = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    pieces = _pieces(fdp, stream)
    got = _run_sse(_sse_c, pieces, limit)
    assert got == _run_sse(_sse_py, pieces, limit), (got, pieces)
    whole = _run_sse(_sse_py, [stream], limit)
    assert ("SSEError" in got) == ("SSEError" in whole)
    if "SSEError" not in got:
        assert [e for c in got[:-1] for e in c] == [e for c in whole[:-1] for e in c]


# -- cachekey -----------------------------------------------------------------------------

def _key(impl, raw: bytes) -> object:
    try:
        return impl.cache_key(raw, "ns")
    except CacheKeyError:
        return CacheKeyError


def cachekey_target(data: bytes) -> None:
    got = _key(_cachekey_c, data)
    assert got == _key(_cachekey_py, data), data
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(parsed, dict) and got is CacheKeyError:
        # Only nesting beyond MAX_DEPTH may refuse what orjson reads.
        assert b"[" * 100 in data or data.count(b"{") + data.count(b"[") > 128, data


# -- translators --------------------------------------------------------------------------

DEPS = {name: Deployment(provider=name, model="m") for name in ("openai", "anthropic", "google")}
BUILDERS = [lambda b: openai.build_chat(b, DEPS["openai"], "http://u/v1", "k"),
            lambda b: anthropic.build_chat(b, DEPS["anthropic"], None, "k"),
            lambda b: google.build_chat(b, DEPS["google"], None, "k"),
            anthropic.ingress_to_openai]


def _only_gateway_errors(fn, *args) -> None:
    try:
        fn(*args)
    except GatewayError as exc:
        assert exc.code != "internal_error", exc


def translators_target(data: bytes) -> None:
    for adapter in (openai, anthropic, google):
        _only_gateway_errors(adapter.parse_chat, data, "m", 0)
        assert isinstance(adapter.map_error(500, data, []), GatewayError)
    anthropic.usage_of(data)
    _only_gateway_errors(anthropic.openai_to_ingress, data, "m")
    events = _sse_py.SSEParser().feed(data + b"\n\n")
    for translator in (anthropic.StreamTranslator("m", True, 0),
                       google.StreamTranslator("m", True, 0)):
        def feed_all(tr=translator) -> None:
            for ev in events:
                tr.feed(ev)
            if hasattr(tr, "close"):
                tr.close()
        _only_gateway_errors(feed_all)
    ingress = anthropic.IngressStreamTranslator("m")
    _only_gateway_errors(lambda: [ingress.feed(ev.data) for ev in events])
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(body, dict):
        for build in BUILDERS:
            try:
                build(body)
            except InvalidRequest:
                pass


TARGETS = {"h1": h1_target, "sse": sse_target, "cachekey": cachekey_target,
           "translators": translators_target}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
