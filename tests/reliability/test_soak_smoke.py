"""The soak benchmark runs end to end: a short run prints its samples, the summary and a
verdict (the real run is 10 minutes: ``python benchmarks/soak.py``)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.support.procs import ROOT


def test_a_short_soak_samples_summarises_and_judges(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "8",
                        "--interval", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    # One line per interval: elapsed, requests, req/s, RSS MB, fds, unexpected.
    samples = [ln for ln in lines if re.match(r"^\s+\d+s\s+\d+\s+\d+\s+[\d.]+\s+\d+\s+\d+$", ln)]
    assert len(samples) == 4, r.stdout
    assert "verdict: FLAT" in lines
    report = json.loads(out.read_text())
    assert report["flat"] is True and len(report["samples"]) == 4
    kinds = {k.split()[0] for k in report["outcomes"]}
    assert kinds == {"chat", "cached", "stream", "disconnect", "bad-json", "unknown-model",
                     "upstream-500", "refused", "bad-key"}
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 for s in report["samples"])
