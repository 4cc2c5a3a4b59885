"""Fixtures for the SQL store tests: the same suite over SQLite and a real Postgres."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.pg import postgres_server  # noqa: F401  (session fixture)

# Fast rhythm for tests: flush every 20 ms, retry the database every 100 ms at most.
FAST = {"flush_s": 0.02, "retry_max_s": 0.1, "shutdown_timeout_s": 5.0}


class Stores:
    """Makes stores of one backend on one database (a new one per test for Postgres)."""

    def __init__(self, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.request = request
        self.opened: list[Any] = []
        self._dsn: str | None = None
        self.db_path = tmp_path / "data" / "gateway.db"
        self.spool_dir = tmp_path / "spool"

    @property
    def server(self) -> Any:
        return self.request.getfixturevalue("postgres_server")

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = self.server.create_database()
        return self._dsn

    def new_database(self) -> None:
        self._dsn = None
        self.db_path = self.tmp_path / f"data{len(self.opened)}" / "gateway.db"

    def make(self, **kw: Any) -> Any:
        kw = {**FAST, "spool_dir": self.spool_dir, **kw}
        if self.backend == "sqlite":
            from gwcore.stores.sqlite import SQLiteStore
            store = SQLiteStore(self.db_path, **kw)
        else:
            from gwcore.stores.postgres import PostgresStore
            store = PostgresStore(self.dsn, **kw)
        self.opened.append(store)
        return store

    async def open(self, **kw: Any) -> Any:
        store = self.make(**kw)
        await store.migrate()
        return store

    def sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL straight on the database (to look at what the store wrote)."""
        if self.backend == "sqlite":
            import sqlite3
            conn = sqlite3.connect(self.db_path)
            try:
                return conn.execute(query, args).fetchall()
            finally:
                conn.close()
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s"), args)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    s = Stores(request.param, tmp_path, request)
    try:
        yield s
    finally:
        for store in s.opened:
            await store.close()


@pytest.fixture
async def pg_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    s = Stores("postgres", tmp_path, request)
    try:
        yield s
    finally:
        for store in s.opened:
            await store.close()
        if not s.server.running():  # an outage test failed half-way
            s.server.start()
