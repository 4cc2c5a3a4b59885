"""The processes of a suite run, and what /proc says about them.

``Stack`` starts (and always stops) the mock upstream, gateways in several configurations,
and for the full-stack scenario a throwaway ``redis-server`` and PostgreSQL (the test
suite's ``RedisServer`` and ``PostgresServer``). Every process gets its own scratch
working directory: the gateway reads ``.env`` and ``config/gateway.yaml`` from its cwd and
writes ``data/`` there, and none of the repository's should leak in.

CPU time and memory come from /proc (no dependency): utime + stime of
``/proc/PID/stat`` and VmRSS of ``/proc/PID/status``, summed over the process and its
descendants (a ``--workers N`` gateway is a supervisor and N children).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.load import BenchError, _Child, _start, free_port, stop, wait_healthy

REPO = Path(__file__).resolve().parent.parent
MOCK_UPSTREAM = REPO / "benchmarks" / "mock_upstream.py"
GATEWAY_KEY = "gw-bench-key"
UPSTREAM_KEY = "sk-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Variables of the caller's environment that would change what a spawned gateway does.
_GATEWAY_VARS = ("GATEWAY_", "OPENAI_", "ANTHROPIC_", "GOOGLE_AI_", "REDIS_URL", "DATABASE_URL",
                 "RATE_LIMIT_")


# -- /proc --------------------------------------------------------------------


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from the ppid field of every /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLK_TCK


def _status_field(path: str, name: str) -> int:
    """The number after ``name:`` in a /proc status file (0 when the file is gone: the
    process or thread ended meanwhile, or the field is not there)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (VmRSS), in bytes."""
    return sum(_status_field(f"/proc/{p}/status", "VmRSS") for p in process_tree(pid)) * 1024


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` and its descendants: each
    is a wait (for a socket, a lock, a timer) that ended, i.e. a wake-up."""
    total = 0
    for p in process_tree(pid):
        try:
            threads = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        total += sum(_status_field(f"/proc/{p}/task/{t}/status", "voluntary_ctxt_switches")
                     for t in threads)
    return total


def pid_alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


# -- the stack ----------------------------------------------------------------


@dataclass
class Spawned:
    name: str
    url: str  # base URL, ".../v1"
    child: _Child
    cwd: Path
    idle_rss: int = 0  # after start and one request
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.child.proc.pid


class Stack:
    """Starts processes on demand and stops all of them on ``close``."""

    def __init__(self, gateway_cpus: str | None, load_cpus: str | None, gateway_args: list[str],
                 gateway_env: dict[str, str]) -> None:
        self.gateway_cpus = gateway_cpus
        self.load_cpus = load_cpus
        self.gateway_args = gateway_args
        self.gateway_env = gateway_env
        self.scratch = Path(tempfile.mkdtemp(prefix="gw-suite-"))
        self.children: list[_Child] = []
        self.redis: Any = None
        self.postgres: Any = None
        self._pg_thread: threading.Thread | None = None
        self._pg_error: BaseException | None = None
        self._names: dict[str, int] = {}

    def _dir(self, name: str) -> Path:
        n = self._names[name] = self._names.get(name, 0) + 1
        path = self.scratch / (f"{name}-{n}" if n > 1 else name)
        path.mkdir(parents=True)
        return path

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GATEWAY_VARS)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env

    def _pinned(self, cpus: str | None, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", cpus, *cmd] if cpus is not None else cmd

    def start_mock(self, name: str = "mock", extra: list[str] | None = None) -> Spawned:
        port = free_port()
        cwd = self._dir(name)
        cmd = [sys.executable, str(MOCK_UPSTREAM), "--host", "127.0.0.1", "--port", str(port), *(extra or [])]
        child = _start(name, self._pinned(self.load_cpus, cmd), self._env(), cwd, self.children)
        wait_healthy(child, f"http://127.0.0.1:{port}")
        return Spawned(name, f"http://127.0.0.1:{port}/v1", child, cwd)

    def start_minimal(self, name: str, upstream_url: str, launcher: list[str] | None = None) -> Spawned:
        """``minimal_proxy.py`` (trio + h11, no logic) in front of ``upstream_url``,
        pinned like the gateway: the floor the gateway's figures are read against.
        ``launcher``: arguments between the interpreter and the script (``profiled.py OUT``)."""
        port = free_port()
        cwd = self._dir(name)
        origin = upstream_url.split("/v1")[0]
        cmd = [sys.executable, *(launcher or []), str(Path(__file__).with_name("minimal_proxy.py")),
               "--port", str(port), "--upstream", origin]
        child = _start(name, self._pinned(self.gateway_cpus, cmd), self._env(), cwd, self.children)
        wait_healthy(child, f"http://127.0.0.1:{port}")
        return Spawned(name, f"http://127.0.0.1:{port}/v1", child, cwd)

    def start_gateway(self, name: str, upstream_url: str, env: dict[str, str] | None = None,
                      config: dict[str, Any] | None = None, launcher: list[str] | None = None) -> Spawned:
        """``gwcore serve`` for the mock at ``upstream_url``: one key, a limit too high to
        trip (so the limiter runs but never answers 429), plus ``env`` and a YAML ``config``
        (merged into the file of a GATEWAY_CONFIG given with --gateway-env, if any).
        ``launcher``: arguments between the interpreter and ``-m gwcore``."""
        port = free_port()
        cwd = self._dir(name)
        full_env = self._env()
        full_env.update(
            OPENAI_API_KEY=UPSTREAM_KEY,
            OPENAI_BASE_URL=upstream_url,
            GATEWAY_API_KEYS=GATEWAY_KEY,
            # The default per-key limit (1000 per hour) would turn a run into 429s.
            RATE_LIMIT_REQUESTS="1000000000",
            RATE_LIMIT_WINDOW="1",
        )
        full_env.update(self.gateway_env)
        full_env.update(env or {})
        if config:
            base: dict[str, Any] = {}
            if full_env.get("GATEWAY_CONFIG"):
                base = yaml.safe_load(Path(full_env["GATEWAY_CONFIG"]).read_text()) or {}
            for section, values in config.items():
                if isinstance(values, dict) and isinstance(base.get(section), dict):
                    base[section] = {**base[section], **values}
                else:
                    base[section] = values
            path = cwd / "gateway.yaml"
            path.write_text(yaml.safe_dump(base, sort_keys=False))
            full_env["GATEWAY_CONFIG"] = str(path)
        cmd = [sys.executable, *(launcher or []), "-m", "gwcore", "serve", "--host", "127.0.0.1",
               "--port", str(port), *self.gateway_args]
        child = _start(name, self._pinned(self.gateway_cpus, cmd), full_env, cwd, self.children)
        origin = f"http://127.0.0.1:{port}"
        wait_healthy(child, origin)
        spawned = Spawned(name, origin + "/v1", child, cwd, env=full_env)
        return spawned

    def settle_idle_rss(self, spawned: Spawned, body: bytes) -> int:
        """One request through the gateway (imports, pools, first allocations), then its RSS."""
        try:
            httpx.post(spawned.url + "/chat/completions", content=body, timeout=30,
                       headers={"authorization": f"Bearer {GATEWAY_KEY}", "content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise BenchError(f"{spawned.name}: the first request failed: {exc!r}\n{spawned.child.output()}") from exc
        time.sleep(0.2)
        spawned.idle_rss = rss_bytes(spawned.pid)
        return spawned.idle_rss

    def stop(self, spawned: Spawned) -> None:
        stop(spawned.child)
        if spawned.child in self.children:
            self.children.remove(spawned.child)

    # -- Redis and PostgreSQL (the full-stack scenario) -------------------------

    def start_postgres_soon(self) -> None:
        """initdb and start in a thread (a few seconds) while other scenarios run."""
        if self._pg_thread is not None:
            return

        def work() -> None:
            try:
                from tests.support.pg import PostgresServer, find_pg_bin

                bin_dir = find_pg_bin()
                if bin_dir is None:
                    raise BenchError("PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
                                     "(Debian: apt-get install postgresql) or set PG_BIN")
                server = PostgresServer(bin_dir)
                self.postgres = server
                server.init()
                server.start()
            except BaseException as exc:  # reported by postgres_url(), in the main thread
                self._pg_error = exc

        self._pg_thread = threading.Thread(target=work, name="postgres-start", daemon=True)
        self._pg_thread.start()

    def postgres_url(self) -> str:
        self.start_postgres_soon()
        assert self._pg_thread is not None
        self._pg_thread.join(120)
        if self._pg_error is not None:
            raise BenchError(f"PostgreSQL did not start: {self._pg_error}")
        if self._pg_thread.is_alive() or self.postgres is None:
            raise BenchError("PostgreSQL did not start within 120 s")
        return f"postgresql://postgres@127.0.0.1:{self.postgres.port}/postgres"

    def redis_url(self) -> str:
        if self.redis is None:
            from tests.support.redis import REDIS_SERVER, RedisServer

            if not os.path.exists(REDIS_SERVER):
                raise BenchError("redis-server is not installed (Debian: apt-get install redis-server)")
            server = RedisServer(free_port())
            server.start()
            self.redis = server
        return str(self.redis.url)

    def close(self) -> None:
        for child in reversed(self.children):
            stop(child)
        self.children.clear()
        if self._pg_thread is not None:
            self._pg_thread.join(120)
        if self.postgres is not None:
            self.postgres.close()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def gateway_version() -> str:
    try:
        done = subprocess.run([sys.executable, "-m", "gwcore", "version"], capture_output=True, text=True,
                              timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(gwcore version failed: {exc!r})"
    return done.stdout.strip() or done.stderr.strip()
