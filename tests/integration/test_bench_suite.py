"""The benchmark suite runs end to end (`python -m benchmarks --quick`), and its fast mock
upstream speaks OpenAI's wire format to the official SDK.

The figures of a quick run mean nothing (one-second runs on a shared machine); what is
checked is that every scenario ran against the spawned gateway and a real Redis and
Postgres, and that the reports hold numbers where numbers belong.
"""
from __future__ import annotations

import json
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.support.mock_openai import DEFAULT_REPLY, embedding_for
from tests.support.pg import find_pg_bin
from tests.support.redis import REDIS_SERVER

REPO = Path(__file__).resolve().parents[2]
MOCK_UPSTREAM = REPO / "benchmarks" / "mock_upstream.py"
LISTENING = "mock upstream listening on "
SCENARIOS = ("latency", "throughput", "maxrate", "stream", "slow-streams", "cpu", "counts", "cache", "full-stack")


@pytest.fixture
def fast_mock() -> Iterator[str]:
    """benchmarks/mock_upstream.py with its default (fast) implementation; its base URL."""
    proc = subprocess.Popen([sys.executable, str(MOCK_UPSTREAM), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith(LISTENING), f"the mock upstream did not start: {line}"
        yield line[len(LISTENING):].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_the_fast_mock_answers_the_official_openai_sdk(fast_mock: str) -> None:
    # Closed at the end: its pooled socket, left to the garbage collector, would fail
    # a later test with a ResourceWarning.
    with openai.OpenAI(base_url=fast_mock, api_key="sk-test", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "Say hello, twice."}]

        first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        second = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert first.object == "chat.completion" and first.model == "gpt-4o-mini"
        assert first.choices[0].message.content == DEFAULT_REPLY
        assert first.choices[0].finish_reason == "stop"
        assert first.usage is not None and first.usage.completion_tokens == 9
        assert first.usage.total_tokens == first.usage.prompt_tokens + 9
        assert first.id != second.id  # answers are rendered once, ids stay unique

        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_REPLY
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 9
        assert all(c.usage is None for c in chunks[:-1])

        # Knobs in the model name: 3 words, paced at 50 tokens/s (3 intervals of 20 ms).
        started = time.monotonic()
        paced = list(client.chat.completions.create(model="gpt-4o-mini@tps=50,words=3", messages=messages,
                                                    stream=True))
        assert time.monotonic() - started >= 0.05
        assert "".join(c.choices[0].delta.content or "" for c in paced) == " ".join(DEFAULT_REPLY.split()[:3])
        assert paced[0].model == "gpt-4o-mini@tps=50,words=3"

        embedded = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [e.embedding for e in embedded.data] == [pytest.approx(embedding_for("a")),
                                                       pytest.approx(embedding_for("b"))]
        assert {m.id for m in client.models.list()} >= {"gpt-4o-mini", "text-embedding-3-small"}
        assert client.responses.create(model="gpt-4o-mini", input="hi").output_text == DEFAULT_REPLY


def test_the_fast_mock_ends_streams_with_done_and_answers_pipelined_requests(fast_mock: str) -> None:
    with httpx.stream("POST", fast_mock + "/chat/completions", timeout=10,
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])

    import socket

    host, port = fast_mock.split("//")[1].split("/")[0].split(":")
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}'
    plain = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    last = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(plain * 2 + chunked + last)  # all at once: pipelined
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 4
    assert data.count(b'"object":"chat.completion"') == 3 and data.endswith(b"}")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_a_quick_suite_run_reports_every_scenario(tmp_path: Path) -> None:
    assert shutil.which("wrk"), "wrk is required for the benchmark suite (apt-get install wrk)"
    assert Path(REDIS_SERVER).exists(), "redis-server is required for the full-stack scenario"
    assert find_pg_bin() is not None, "PostgreSQL binaries are required for the full-stack scenario"
    out = tmp_path / "report"

    # A generous p99 budget: on a shared machine the gateway's p99 is no measure of
    # anything, and the smoke run should find a non-zero rate.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--p99-budget-ms", "2000", "--out", str(out)],
        capture_output=True, text=True, timeout=170, cwd=REPO)

    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    report = json.loads((out / "report.json").read_text())
    assert list(report["scenarios"]) == list(SCENARIOS)
    assert [e["name"] for e in report["endpoints"]] == ["upstream", "gwcore"]
    gateway_names = {"cache": "gwcore+cache", "full-stack": "gwcore+redis+pg"}
    for name, scenario in report["scenarios"].items():
        targets = {r["target"] for r in scenario["rows"]}
        expected = {"gwcore"} if name == "counts" else {"upstream", gateway_names.get(name, "gwcore")}
        assert targets == expected, (name, targets)  # counts: only what the suite starts is profiled
        for r in scenario["rows"]:
            assert not r.get("errors") and not r.get("failed"), (name, r)

    def rows(name: str, **where: Any) -> dict[str, dict[str, Any]]:
        found = {r["target"]: r for r in report["scenarios"][name]["rows"]
                 if all(r.get(k) == v for k, v in where.items())}
        assert len(found) == 2, (name, where, found)
        return found

    for name, c in (("latency", 1), ("throughput", 32), ("throughput", 256), ("cache", 1), ("cache", 32),
                    ("full-stack", 1), ("full-stack", 32)):
        for r in rows(name, connections=c).values():
            assert r["rps"] > 0 and r["requests"] > 0, (name, c, r)
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p99.9_ms"], (name, c, r)
            if r["role"] == "target":
                assert r["rps_vs_upstream"] > 0 and "added_p50_ms" in r, (name, c, r)
    for r in rows("maxrate").values():
        assert r["max_rate"] > 0 and r["rps"] > 0 and r["p99_ms"] < 2000, r
    for r in rows("stream").values():
        assert r["rps"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"], r
        assert r["events"] >= 12 and r["stream_bytes"] > 1000 and r["long_events"] >= 100, r
    assert rows("stream")["gwcore"]["chunk_us"] >= 0
    for r in rows("slow-streams", streams=50).values():
        assert r["sustained"] and r["completed"] == 50 == r["peak_open"], r
        assert r["ttft_p50_ms"] > 0 and r["idle_rss"] > 10 * 2**20 and r["peak_rss"] >= r["idle_rss"], r
    for r in rows("cpu").values():
        # CPU time comes in clock ticks (10 ms): the mock's 200 requests of a quick run
        # may all fit in less than one.
        assert r["cpu_us_per_request"] >= 0 and r["requests"] > 0 and r["rps"] > 0, r
    assert rows("cpu")["gwcore"]["cpu_us_per_request"] > 0
    assert rows("cpu")["gwcore"]["wakeups_per_request"] > 0
    (counted,) = report["scenarios"]["counts"]["rows"]
    assert counted["requests"] > 0 and counted["task_steps_per_request"] > 0, counted
    assert counted["python_calls_per_request"] > counted["own_calls_per_request"] > 0, counted
    audit = " ".join(report["scenarios"]["full-stack"]["notes"])
    assert "audit rows in Postgres after the runs: " in audit and "could not count" not in audit, audit
    assert int(audit.split("after the runs: ")[1].split()[0]) > 0, audit

    figures = {item["figure"]: item["values"] for item in report["summary"]}
    assert figures["chat req/s, c=32"]["gwcore"] > 0 and figures["chat req/s, c=32"]["upstream"] > 0
    assert figures["slow streams sustained (all complete, all open at once)"] == {"upstream": 50, "gwcore": 50}
    assert figures["Redis + Postgres: req/s, c=32"]["gwcore"] > 0

    markdown = (out / "report.md").read_text()
    assert "## Summary" in markdown and "![latency percentiles](latency.png)" in markdown
    for name in SCENARIOS:
        assert f"## {name}: " in markdown
    assert markdown.strip() in done.stdout
    width, height = _png_size(out / "latency.png")
    assert width >= 800 and height >= 600
    assert (out / "latency.png").stat().st_size > 20_000


@pytest.mark.slow
def test_the_minimal_proxy_floor_is_measured_beside_the_gateway(tmp_path: Path) -> None:
    """``--minimal``: benchmarks/minimal_proxy.py (trio + h11, no logic) as a target of
    its own, plain and streamed, so the gateway's figures can be read against the floor."""
    assert shutil.which("wrk"), "wrk is required for the benchmark suite (apt-get install wrk)"
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--minimal", "--scenarios", "latency,stream,counts",
         "--no-plot", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    report = json.loads((out / "report.json").read_text())
    assert [e["name"] for e in report["endpoints"]] == ["upstream", "gwcore", "trio+h11 minimal"]
    latency = {r["target"]: r for r in report["scenarios"]["latency"]["rows"]}
    stream = {r["target"]: r for r in report["scenarios"]["stream"]["rows"]}
    floor = latency["trio+h11 minimal"]
    assert floor["rps"] > 0 and floor["added_p50_ms"] > 0 and not floor.get("errors"), floor
    s = stream["trio+h11 minimal"]
    assert s["rps"] > 0 and s["events"] == stream["upstream"]["events"] and not s.get("errors"), s
    # Both profiled; the floor's own code is a 60-line proxy, the gateway's a pipeline
    # that makes more calls.
    counts = {r["target"]: r for r in report["scenarios"]["counts"]["rows"]}
    assert counts.keys() == {"gwcore", "trio+h11 minimal"}
    gw, fl = counts["gwcore"], counts["trio+h11 minimal"]
    assert 0 < fl["own_calls_per_request"] < gw["own_calls_per_request"], (gw, fl)
    assert gw["python_calls_per_request_vs_floor"] == gw["python_calls_per_request"] / fl["python_calls_per_request"]
    assert "python_calls_per_request_vs_floor" not in fl and fl["task_steps_per_request"] > 0, fl
    top = list(fl["top_calls_per_request"].values())  # the 15 most called, most first
    assert len(top) == 15 and top == sorted(top, reverse=True) and top[0] > 0, fl
