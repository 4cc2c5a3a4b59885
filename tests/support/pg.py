"""A real PostgreSQL server for the tests: one per session, a database per test.

``initdb`` + ``pg_ctl`` on a temporary directory, on a free port, with its socket in that
directory and ``fsync=off`` (a test server loses nothing worth keeping on a crash).
Postgres refuses to run as root, so as root the binaries run as the ``postgres`` user
on a directory that user owns.  ``stop()`` / ``start()`` serve the outage tests.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port

PG_BIN_DIRS = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
PG_BIN_DIRS += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def find_pg_bin() -> Path | None:
    for d in PG_BIN_DIRS:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self._names = itertools.count(1)

    def _run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL, cwd=self.base)
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout}\n"
                               f"{r.stderr}\n{log}")
        return r

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
                # synchronous_commit on: a commit is written to the OS before it is
                # acknowledged, so a killed server (stop -m immediate, as the outage
                # tests do) keeps what it acknowledged; fsync off only risks an OS crash.
                " -c fsync=off -c synchronous_commit=on -c full_page_writes=off"
                " -c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                  "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        r = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                            str(self.port), "-t", "1"], capture_output=True,
                           stdin=subprocess.DEVNULL)
        return r.returncode == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        """A new empty database (from template0); returns its DSN."""
        import psycopg

        name = f"gw_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return self.dsn(name)

    def close(self) -> None:
        try:
            if self.data.exists():
                self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                    f"{', '.join(map(str, PG_BIN_DIRS)) or '/usr/lib/postgresql/*/bin'} or on "
                    "PATH: install them (Debian: apt-get install postgresql) or set PG_BIN",
                    pytrace=False)
    server = PostgresServer(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()
