"""The configured SQL store: Postgres when ``DATABASE_URL`` is set, else the SQLite file.

One object serves as KeyStore and AuditSink (see ``gwcore.ports``)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gwcore.config import Config


def make_sql_store(cfg: Config) -> Any:
    st = cfg.storage
    if cfg.database_url:
        from gwcore.stores.postgres import PostgresStore

        return PostgresStore(cfg.database_url, spool_dir=st.spool_dir,
                             retention_days=st.retention_days)
    from gwcore.stores.sqlite import SQLiteStore

    return SQLiteStore(st.sqlite_path, spool_dir=st.spool_dir, retention_days=st.retention_days)


@asynccontextmanager
async def open_sql_store(cfg: Config) -> AsyncIterator[Any]:
    store = make_sql_store(cfg)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()
