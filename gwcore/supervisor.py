"""``--workers N``: N worker processes on one port, under a small supervisor.

How this works: the supervisor binds the address once with SO_REUSEPORT (without
listening, so the kernel routes no connection to it) to reserve the port, resolving
port 0 to a real one; then it starts N workers, ``python -m gwcore serve --worker``,
each of which opens its own listening socket on that port with SO_REUSEPORT, and the
kernel spreads new connections across them.  Workers learn N from ``GATEWAY_WORKERS``
(the Redis-down fallback gives each 1/N of a limit) and their index from
``GATEWAY_WORKER_INDEX``.

    state      event                       action
    running    a worker exits (crash)      restart it after a backoff (0.1 s doubling to
                                           5 s; reset once a worker has lived 30 s)
    running    SIGTERM / SIGINT            forward SIGTERM to every worker: draining
    draining   all workers exited          exit 0
    draining   grace + 5 s passed          SIGKILL the rest, exit 0
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from gwcore.accesslog import event

RESTART_BACKOFF_MIN_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
HEALTHY_LIFETIME_S = 30.0
POLL_S = 0.05


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, sock.getsockname()[1]


class Supervisor:
    def __init__(self, argv: list[str], host: str, port: int, workers: int,
                 grace_s: float) -> None:
        self.argv = argv
        self.host = host
        self.port = port
        self.workers = workers
        self.grace_s = grace_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.restarts = 0
        self._stop_signal: int | None = None

    def _spawn(self, index: int) -> None:
        env = dict(os.environ, GATEWAY_WORKERS=str(self.workers),
                   GATEWAY_WORKER_INDEX=str(index))
        cmd = [sys.executable, "-m", "gwcore", "serve", *self.argv, "--worker",
               "--host", self.host, "--port", str(self.port)]
        self.procs[index] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self.started_at[index] = time.monotonic()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        reserved, self.port = reserve_port(self.host, self.port)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for i in range(self.workers):
                self._spawn(i)
            event("supervisor", host=self.host, port=self.port, workers=self.workers,
                  pids=[p.pid for p in self.procs.values()])
            pending: dict[int, float] = {}  # worker index -> when to restart it
            while self._stop_signal is None:
                now = time.monotonic()
                for i, proc in list(self.procs.items()):
                    if i in pending or proc.poll() is None:
                        continue
                    lived = now - self.started_at[i]
                    delay = RESTART_BACKOFF_MIN_S if lived > HEALTHY_LIFETIME_S else \
                        min(self.backoff.get(i, RESTART_BACKOFF_MIN_S / 2) * 2,
                            RESTART_BACKOFF_MAX_S)
                    self.backoff[i] = delay
                    pending[i] = now + delay
                    event("worker exited", worker=i, pid=proc.pid, code=proc.returncode,
                          restart_in_s=delay)
                for i, when in list(pending.items()):
                    if now >= when:
                        del pending[i]
                        self.restarts += 1
                        self._spawn(i)
                        event("worker restarted", worker=i, pid=self.procs[i].pid)
                time.sleep(POLL_S)
            return self._drain()
        finally:
            reserved.close()

    def _drain(self) -> int:
        event("supervisor draining", signal=signal.Signals(self._stop_signal or 15).name)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(POLL_S)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        event("supervisor stopped")
        return 0
