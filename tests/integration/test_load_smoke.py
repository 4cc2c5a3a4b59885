"""The load driver runs end to end: two mock upstreams, a quick wrk run against each."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
MOCK_UPSTREAM = REPO / "benchmarks" / "mock_upstream.py"
LOAD = REPO / "benchmarks" / "load.py"
LISTENING = "mock upstream listening on "


def start_mock_upstream() -> tuple[subprocess.Popen[str], str]:
    """A mock upstream on a free port, and its base URL (read from the line it prints)."""
    proc = subprocess.Popen(
        [sys.executable, str(MOCK_UPSTREAM), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(LISTENING):
        stop(proc)
        rest = proc.stdout.read()
        raise AssertionError(f"the mock upstream did not start: {line}{rest}")
    return proc, line[len(LISTENING) :].strip()


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def two_mock_upstreams() -> Iterator[tuple[str, str]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for _ in range(2):
            proc, url = start_mock_upstream()
            procs.append(proc)
            urls.append(url)
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def rates_in(table: str) -> dict[tuple[str, int], float]:
    """(target label, connections) -> req/s, from the load table (9 columns; the TTFB one has 5)."""
    rates = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in ("target", "upstream") and cells[1].isdigit():
            rates[(cells[0], int(cells[1]))] = float(cells[2].replace(",", ""))
    return rates


@pytest.mark.parametrize("mode", [[], ["--stream"]], ids=["chat", "stream"])
def test_a_quick_run_reports_a_rate_for_target_and_upstream(
    two_mock_upstreams: tuple[str, str], mode: list[str], tmp_path: Path
) -> None:
    assert shutil.which("wrk"), "wrk is required for the load driver and its smoke test (apt-get install wrk)"
    target, upstream = two_mock_upstreams
    report = tmp_path / "report.json"

    done = subprocess.run(
        [sys.executable, str(LOAD), "--quick", "--target", target, "--upstream", upstream, "--json", str(report), *mode],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rates = rates_in(done.stdout)
    assert set(rates) == {("target", 1), ("target", 8), ("upstream", 1), ("upstream", 8)}, done.stdout
    assert all(rate > 0 for rate in rates.values()), done.stdout
    figures = json.loads(report.read_text())
    assert {(r["label"], r["connections"]) for r in figures["runs"]} == set(rates)
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in figures["runs"])
    if mode:
        assert [t["label"] for t in figures["ttfb"]] == ["upstream", "target"]
        assert all(t["requests"] > 0 and t["p50_ms"] > 0 for t in figures["ttfb"])
