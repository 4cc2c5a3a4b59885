"""Running docker/entrypoint.sh on the host, with the repo's gwcore instead of an image's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
ENV_EXAMPLE = DOCKER / ".env.example"

# Variables from the caller's environment that would change what the entrypoint does.
_STRIP = ("GATEWAY_", "OPENAI_", "ANTHROPIC_", "GOOGLE_AI_", "GWCORE_")
_STRIP_NAMES = {"REDIS_URL", "DATABASE_URL", "WAIT_TIMEOUT_S", "RATE_LIMIT_REQUESTS",
                "RATE_LIMIT_WINDOW", "PYTHON"}


def entrypoint_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_STRIP) and k not in _STRIP_NAMES}
    env.update({
        "GWCORE": f"{sys.executable} -m gwcore",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        # No /etc/gwcore/gateway.yaml of the host machine: a directory of the test's own.
        "GWCORE_CONFIG_DIR": str(workdir / "etc-gwcore"),
    })
    env.update(extra or {})
    return env


class Entrypoint:
    """docker/entrypoint.sh as a process (cwd: its own scratch dir, like /var/lib/gwcore),
    stdout and stderr to files so they can be read while it runs."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ("--demo",), port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port or free_port()
        self.out_path = workdir / "stdout.log"
        self.err_path = workdir / "stderr.log"
        full_env = entrypoint_env(workdir, {"GATEWAY_HOST": "127.0.0.1",
                                            "GATEWAY_PORT": str(self.port), **(env or {})})
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([str(ENTRYPOINT), *args], cwd=workdir, env=full_env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The gateway's JSON event lines on stderr."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    pass
        return out

    def wait_healthy(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"entrypoint exited with {self.proc.returncode}:\n"
                                     f"{self.stdout()}\n{self.stderr()}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=1)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"no 200 from /healthz within {timeout_s} s:\n"
                             f"{self.stdout()}\n{self.stderr()}")

    def terminate(self, timeout_s: float = 45) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_entrypoint(workdir: Path, env: dict[str, str], *args: str,
                   timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(ENTRYPOINT), *args], cwd=workdir, check=False,
                          env=entrypoint_env(workdir, env), capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
