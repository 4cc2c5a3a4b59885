"""docker/entrypoint.sh on the host, with the repo's gwcore (GWCORE="python -m gwcore").

The image runs exactly this script; here it runs against a real Postgres that starts
late, the way a database container comes up after the gateway's."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from gwcore.config import PLACEHOLDER_MARKERS, read_dotenv
from gwcore.stores.audit import load_migrations
from tests.deploy.helpers import DOCKER, ENV_EXAMPLE, Entrypoint, run_entrypoint
from tests.support.pg import PostgresServer, find_pg_bin
from tests.support.procs import free_port, gwcore

HEALTHCHECK = DOCKER / "healthcheck.py"


@pytest.fixture
def late_postgres():
    """A Postgres cluster, initialised but NOT started: the test starts it."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL server binaries not found (Debian: apt-get install "
                    "postgresql, or set PG_BIN)", pytrace=False)
    server = PostgresServer(bin_dir)
    try:
        server.init()
        yield server
    finally:
        server.close()


@pytest.mark.slow
def test_waits_for_late_postgres_migrates_once_and_execs_the_gateway(late_postgres, tmp_path):
    pg = late_postgres
    url = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    env = {"DATABASE_URL": url, "WAIT_TIMEOUT_S": "60"}
    # Two replicas starting together, before their database is up.
    replicas = [Entrypoint(tmp_path / name, env) for name in ("a", "b")]
    try:
        time.sleep(2.0)
        for ep in replicas:
            assert ep.proc.poll() is None, ep.stderr()
            assert f"waiting for postgres at 127.0.0.1:{pg.port} (from DATABASE_URL" \
                in ep.stderr()
            assert "listening" not in ep.stderr()

        started = time.monotonic()
        pg.start()
        for ep in replicas:
            health = ep.wait_healthy(timeout_s=60)
            # exec: the gateway answering is the entrypoint's own process.
            assert health["pid"] == ep.proc.pid
        took = time.monotonic() - started

        for ep in replicas:
            err = ep.stderr()
            assert f"postgres at 127.0.0.1:{pg.port} is reachable after" in err
            assert "running migrations (gwcore migrate)" in err
            assert "starting: gwcore serve --demo" in err
            listening = [e for e in ep.events() if e.get("msg") == "listening"]
            assert listening and listening[0]["ports"] == [ep.port]

        # The migration ran exactly once: one replica applied every version (under the
        # advisory lock), the other found them done; one row per version.
        expected = [v for v, _, _ in load_migrations("postgres")]
        outs = sorted(ep.stdout() for ep in replicas)
        applied = [o for o in outs if f"migrations applied to postgres: {expected}" in o]
        up_to_date = [o for o in outs if "migrations applied to postgres: none (up to date)" in o]
        assert len(applied) == 1 and len(up_to_date) == 1, outs
        with psycopg.connect(pg.dsn()) as conn:
            rows = conn.execute("SELECT version, count(*) FROM schema_migrations "
                                "GROUP BY version ORDER BY version").fetchall()
        assert rows == [(v, 1) for v in expected]

        # A third replica, later: nothing left to apply, same rows.
        third = Entrypoint(tmp_path / "c", env)
        replicas.append(third)
        third.wait_healthy(timeout_s=30)
        assert "migrations applied to postgres: none (up to date)" in third.stdout()
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == \
                (len(expected),)

        # The image's HEALTHCHECK script against a live gateway, and a dead port.
        for port, code in ((third.port, 0), (free_port(), 1)):
            r = subprocess.run([sys.executable, str(HEALTHCHECK)], check=False, capture_output=True,
                               env={"GATEWAY_PORT": str(port)}, timeout=10)
            assert r.returncode == code, r.stderr

        # SIGTERM to the entrypoint's PID reaches the gateway (it is the gateway).
        for ep in replicas:
            assert ep.terminate(timeout_s=45) == 0, ep.stderr()
            msgs = [e.get("msg") for e in ep.events()]
            assert "draining" in msgs and msgs[-1] == "stopped", msgs
        print(f"postgres start -> both replicas healthy: {took:.1f} s")
    finally:
        for ep in replicas:
            ep.kill()


@pytest.mark.parametrize("var, url", [
    ("DATABASE_URL", "postgresql://gw:s3cret-pass-word@127.0.0.1:{port}/gw"),
    ("DATABASE_URL", "host=127.0.0.1 port={port} user=gw password=s3cret-pass-word"),
    ("REDIS_URL", "redis://:s3cret-pass-word@127.0.0.1:{port}/0"),
    ("REDIS_URL", "rediss://default:s3cret-pass-word@127.0.0.1:{port}"),
])
def test_unreachable_server_times_out_with_a_clear_error(tmp_path, var, url):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    r = run_entrypoint(tmp_path, {var: url.format(port=port), "WAIT_TIMEOUT_S": "2",
                                  "GATEWAY_PORT": str(free_port())}, "--demo", timeout_s=30)
    took = time.monotonic() - started
    assert r.returncode == 1, (r.stdout, r.stderr)
    name = "postgres" if var == "DATABASE_URL" else "redis"
    assert re.search(rf"gwcore-entrypoint: error: {name} at 127\.0\.0\.1:{port} \(from {var}\) "
                     r"is not reachable after waiting 2 s \(WAIT_TIMEOUT_S\): ", r.stderr), r.stderr
    assert "s3cret-pass-word" not in r.stdout + r.stderr  # never the URL, only host:port
    assert "running migrations" not in r.stderr and "listening" not in r.stderr
    assert 1.5 < took < 20


def test_sigterm_during_the_wait_stops_at_once(tmp_path):
    """In a container the entrypoint is PID 1 until it execs, and PID 1 has no default
    signal actions: it must trap SIGTERM itself, and take its waiter with it."""
    tag = f"gwcore-deploy-test-{time.time_ns()}"
    url = f"postgresql://gw@127.0.0.1:{free_port()}/gw"
    ep = Entrypoint(tmp_path, {"DATABASE_URL": url, "WAIT_TIMEOUT_S": "60",
                               "GWCORE_TEST_TAG": tag})
    try:
        deadline = time.monotonic() + 20
        while "waiting for postgres" not in ep.stderr():
            assert ep.proc.poll() is None and time.monotonic() < deadline, ep.stderr()
            time.sleep(0.05)
        started = time.monotonic()
        assert ep.terminate(timeout_s=10) == 143
        assert time.monotonic() - started < 3
        assert "SIGTERM received before the gateway started; stopping" in ep.stderr()
        time.sleep(0.2)
        assert _processes_tagged(tag) == [], "the waiter outlived the entrypoint"
    finally:
        ep.kill()
        for pid in _processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)


def _processes_tagged(tag: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"GWCORE_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            pass
    return pids


def test_wait_timeout_must_be_a_number(tmp_path):
    r = run_entrypoint(tmp_path, {"WAIT_TIMEOUT_S": "soon"}, timeout_s=30)
    assert r.returncode == 1
    assert "WAIT_TIMEOUT_S must be a whole number of seconds, got 'soon'" in r.stderr


def _example_env() -> dict[str, str]:
    # Read with the gateway's own .env parser: what `gwcore` itself would make of it.
    return read_dotenv(ENV_EXAMPLE)


def test_example_placeholders_stop_the_entrypoint_before_any_wait(tmp_path):
    env = _example_env()
    assert env["DATABASE_URL"] and env["REDIS_URL"]  # hosts that do not resolve here
    started = time.monotonic()
    r = run_entrypoint(tmp_path, env, timeout_s=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert time.monotonic() - started < 20  # WAIT_TIMEOUT_S is 60: it did not wait
    assert "GATEWAY_MASTER_KEY: still holds a placeholder secret" in r.stderr
    assert "GATEWAY_API_KEYS: still holds a placeholder secret" in r.stderr
    assert "the configuration is invalid" in r.stderr
    assert "waiting for" not in r.stderr and "listening" not in r.stderr


def test_gateway_refuses_to_start_with_the_example_env_file(tmp_path):
    # docker compose's env_file, or the .env the gateway reads from its working dir.
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    r = gwcore("serve", "--port", str(free_port()), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "placeholder" in r.stderr
    r = gwcore("serve", "--port", str(free_port()), env=_example_env())
    assert r.returncode == 2 and "placeholder" in r.stderr


def test_example_is_valid_once_the_placeholders_are_replaced():
    env = _example_env()
    real = {k: re.sub("change-me-[a-z0-9-]+", "s3cret-value-for-test", v)
            for k, v in env.items()}
    assert not any(m in v.lower() for v in real.values() for m in PLACEHOLDER_MARKERS)
    r = gwcore("check-config", env=real)
    assert r.returncode == 0, r.stderr


def test_example_lists_every_variable_of_the_readme_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {n for line in table for n in re.findall(r"`([A-Z][A-Z0-9_]+)`",
                                                          line.split("|")[1])}
    assert {"GATEWAY_MASTER_KEY", "DATABASE_URL", "RATE_LIMIT_WINDOW"} <= documented
    env = _example_env()
    assert documented - set(env) == set()
    for secret in ("GATEWAY_MASTER_KEY", "GATEWAY_API_KEYS", "OPENAI_API_KEY",
                   "ANTHROPIC_API_KEY", "GOOGLE_AI_API_KEY", "POSTGRES_PASSWORD",
                   "REDIS_PASSWORD"):
        assert env[secret].startswith("change-me-"), secret
    # The URLs carry the same placeholder passwords as the servers' own variables.
    assert f":{env['POSTGRES_PASSWORD']}@postgres:5432/" in env["DATABASE_URL"]
    assert f":{env['REDIS_PASSWORD']}@redis:6379" in env["REDIS_URL"]


def test_config_file_in_the_config_dir_is_used(tmp_path):
    etc = tmp_path / "etc-gwcore"
    etc.mkdir()
    (etc / "gateway.yaml").write_text("server:\n  prot: 8080\n")  # a typo: must be reported
    r = run_entrypoint(tmp_path, {}, timeout_s=30)
    assert r.returncode == 2
    assert f"using {etc / 'gateway.yaml'}" in r.stderr
    assert "server.prot: unknown field" in r.stderr


def test_sqlite_default_migrates_and_serves(tmp_path):
    """No DATABASE_URL: nothing to wait for, the SQLite file under data/ is migrated."""
    ep = Entrypoint(tmp_path, {"WAIT_TIMEOUT_S": "5"})
    try:
        health = ep.wait_healthy(timeout_s=30)
        assert health["pid"] == ep.proc.pid
        expected = [v for v, _, _ in load_migrations("sqlite")]
        assert f"migrations applied to data/gateway.db: {expected}" in ep.stdout()
        assert (tmp_path / "data" / "gateway.db").is_file()
        assert "waiting for" not in ep.stderr()
        assert ep.terminate() == 0
    finally:
        ep.kill()


def test_other_commands_run_instead_of_serve(tmp_path):
    r = run_entrypoint(tmp_path, {}, "version", timeout_s=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gwcore ")
    assert "running migrations" not in r.stderr
