"""Running the gateway as a real subprocess (``python -m gwcore``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gwcore(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    cwd = cwd or Path(tempfile.mkdtemp(prefix="gwcore-test-"))
    return subprocess.run([sys.executable, "-m", "gwcore", *args], capture_output=True,
                          text=True, env=_env(env), cwd=cwd, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "OPENAI_", "ANTHROPIC_", "GOOGLE_AI_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def start_gateway(*args: str, env: dict[str, str] | None = None,
                  cwd: Path | None = None, stdout: Any = subprocess.PIPE,
                  stderr: Any = subprocess.PIPE) -> tuple[subprocess.Popen[bytes], int]:
    """``gwcore serve`` on a free port; returns once /healthz answers.

    ``stdout``/``stderr`` are passed to Popen: pipes by default; a file for a gateway
    that logs more than a pipe holds (64 KiB) before the test reads it, since a full
    pipe blocks the gateway's writes."""
    port = free_port()
    # A scratch working directory: the gateway's data/ (SQLite, spool) goes there.
    cwd = cwd or Path(tempfile.mkdtemp(prefix="gwcore-test-"))
    proc = subprocess.Popen([sys.executable, "-m", "gwcore", "serve", "--port", str(port), *args],
                            env=_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"gateway exited with {proc.returncode}: "
                               f"{err.decode() if err else '(stderr not captured)'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    proc.communicate()
    raise RuntimeError("gateway did not become healthy within 20 s")
