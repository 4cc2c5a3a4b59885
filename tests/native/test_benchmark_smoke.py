"""benchmarks/native.py runs every scenario and reports a ratio per module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_native_benchmark_runs_quickly_and_reports_each_module() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "native.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for module in ("cachekey", "sse", "buckets"):
        assert any(line.startswith(f"ratio {module}: ") for line in lines), result.stdout
        assert any(line.startswith(f"| {module} |") for line in lines), result.stdout
    assert "|---|" in result.stdout  # a Markdown table
