"""The gateway as users run it: a process, signals, the command line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import orjson
import pytest

from tests.support.procs import ROOT, gwcore, start_gateway

SLOW_DEMO = "providers:\n  mock: {base_url: 'mock://demo?tokens_per_s=10'}\n"


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(SLOW_DEMO)
    proc, port = start_gateway("--demo", "--config", str(cfg))
    try:
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                              json={"model": "mock-1", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]},
                              timeout=30) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        t.join(30)
        assert lines[-1] == "data: [DONE]"  # the stream ran to its end
        assert proc.wait(30) == 0
        err = proc.stderr.read().decode()
        assert '"msg":"draining"' in err and '"msg":"stopped"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_grace_period_cuts_streams_that_run_too_long(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("server: {shutdown_grace_s: 0.5}\n"
                   "providers:\n  mock: {base_url: 'mock://demo?tokens_per_s=2'}\n")
    proc, port = start_gateway("--demo", "--config", str(cfg))
    try:
        got_first = threading.Event()
        done = threading.Event()
        lines: list[str] = []
        errors: list[Exception] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                  json={"model": "mock-1", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]},
                                  timeout=30) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        got_first.set()
            except httpx.HTTPError as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=stream, daemon=True).start()
        assert got_first.wait(10)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 3
        assert done.wait(5)
        # Cut off: the client saw a broken chunked body, never the end of the stream.
        assert errors and "data: [DONE]" not in lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_refuses_a_public_address_without_keys_unless_no_auth():
    r = gwcore("serve", "--demo", "--host", "0.0.0.0", "--port", "0", timeout_s=20)
    assert r.returncode == 2
    assert "--no-auth" in r.stderr


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path):
    (tmp_path / "gateway.yaml").write_text(
        "models:\n  - name: chat\n    deployments:\n"
        "      - {provider: openai, model: gpt-4o-mini, api_key: '${TEAM_KEY}'}\n")
    env = {"TEAM_KEY": "sk-team-very-secret-1", "GATEWAY_MASTER_KEY": "master-very-secret-2",
           "DATABASE_URL": "postgresql://gw:dbpassword@db/gw"}
    r = gwcore("check-config", "--config", str(tmp_path / "gateway.yaml"), env=env)
    assert r.returncode == 0, r.stderr
    cfg = orjson.loads(r.stdout)
    assert cfg["models"][0]["deployments"][0]["model"] == "gpt-4o-mini"
    for secret in ("sk-team-very-secret-1", "master-very-secret-2", "dbpassword"):
        assert secret not in r.stdout


def test_check_config_lists_every_error_with_its_path_and_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "server: {port: high}\n"
        "models:\n  - name: chat\n    deployments:\n      - {provider: nope, model: x}\n"
        "cache: {ttl_s: soon, colour: blue}\n")
    r = gwcore("check-config", "--config", str(tmp_path / "bad.yaml"),
               env={"GATEWAY_WORKERS": "many"})
    assert r.returncode == 2
    for expected in ("server.port: expected an integer, got 'high'",
                     "models[0].deployments[0].provider: expected one of",
                     "cache.ttl_s: expected a number, got 'soon'",
                     "cache.colour: unknown field",
                     "GATEWAY_WORKERS: expected an integer, got 'many'"):
        assert expected in r.stderr


def test_placeholder_secrets_are_refused(tmp_path):
    r = gwcore("check-config", env={"GATEWAY_MASTER_KEY": "change-me-master-key"},
               cwd=tmp_path)
    assert r.returncode == 2
    assert "placeholder" in r.stderr


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("GATEWAY_PORT=9999\nexport GATEWAY_HOST='127.0.0.2'\n")
    r = gwcore("check-config", env={"GATEWAY_PORT": "7777"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    server = orjson.loads(r.stdout)["server"]
    assert (server["host"], server["port"]) == ("127.0.0.2", 7777)


def test_version_says_which_native_modules_are_active():
    r = gwcore("version")
    assert r.returncode == 0
    assert "gwnative: " in r.stdout
    for module in ("buckets", "cachekey", "sse"):
        assert f"  {module}: " in r.stdout


def test_python_dash_m_and_console_script_agree():
    assert (ROOT / "gwcore" / "__main__.py").is_file()
    r = gwcore("--help")
    assert r.returncode == 0 and "serve" in r.stdout


def test_workers_share_one_port_and_a_crashed_worker_is_restarted(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(SLOW_DEMO)
    proc, port = start_gateway("--demo", "--workers", "2", "--config", str(cfg))
    try:
        def pids(n: int = 60) -> set[int]:
            seen = set()
            for _ in range(n):  # a new connection each time: the kernel spreads them
                seen.add(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["pid"])
            return seen

        deadline = time.monotonic() + 15
        first = pids()
        while len(first) < 2 and time.monotonic() < deadline:  # the second may still start
            first |= pids(20)
        assert len(first) == 2, first
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                seen = pids(20)
            except httpx.HTTPError:
                continue
            if len(seen) == 2 and victim not in seen:
                break
        assert len(seen) == 2 and victim not in seen, (victim, seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read().decode()
        assert '"msg":"worker restarted"' in err and '"msg":"supervisor stopped"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_migrate_creates_the_schema_once(tmp_path):
    first = gwcore("migrate", cwd=tmp_path)
    assert first.returncode == 0 and "[1]" in first.stdout, first.stderr
    again = gwcore("migrate", cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (tmp_path / "data" / "gateway.db").is_file()
    bad = gwcore("migrate", cwd=tmp_path, env={"DATABASE_URL": "postgresql://127.0.0.1:1/x"})
    assert bad.returncode == 1 and "migration failed" in bad.stderr


def test_the_gateway_lifts_its_open_file_limit_to_the_hard_limit() -> None:
    """Each client connection and open upstream stream is a descriptor: a worker
    started with the common soft limit (1024) raises it itself."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024, "this machine's hard limit leaves nothing to check"
    cmd = ["prlimit", f"--nofile=1024:{hard}", sys.executable, "-m", "gwcore", "serve",
           "--demo", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=tempfile.mkdtemp(prefix="gwcore-test-"))
    try:
        deadline = time.monotonic() + 20
        limit = None
        while time.monotonic() < deadline and child.poll() is None:
            with open(f"/proc/{child.pid}/limits") as f:
                lines = f.read().splitlines()
            for line in lines:
                if line.startswith("Max open files"):
                    limit = int(line.split()[3])
            if limit == hard:
                break
            time.sleep(0.1)
        assert limit == hard
    finally:
        child.terminate()
        child.wait(10)
