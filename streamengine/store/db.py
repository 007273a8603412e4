"""PostgreSQL connection pool and schema migrations (asyncpg)."""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from streamengine.config import DatabaseSettings
from streamengine.errors import ServiceUnavailable

log = logging.getLogger(__name__)

# Any value; serialises concurrent migrations of several replicas starting at once.
_MIGRATION_LOCK = 0x5E_0001


def redacted_target(url: str) -> str:
    """host:port/db of a DSN, without user or password (safe for logs and errors)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """Owns the pool; repositories (ingest, jobs, registry, outbox) borrow connections from it."""

    def __init__(self, pool: asyncpg.Pool, target: str) -> None:
        self.pool = pool
        self.target = target

    @classmethod
    async def connect(cls, settings: DatabaseSettings, migrate: bool = True) -> Database:
        url = settings.url.get_secret_value()
        target = redacted_target(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=settings.pool_min,
                max_size=settings.pool_max,
                init=_init_connection,
                timeout=10,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ServiceUnavailable("PostgreSQL", target, _safe_reason(exc, url)) from None
        db = cls(pool, target)
        if migrate:
            await db.migrate()
        return db

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        try:
            async with self.pool.acquire(timeout=5) as conn:
                await conn.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ServiceUnavailable("PostgreSQL", self.target, type(exc).__name__) from None

    async def migrate(self) -> list[str]:
        """Apply every migration not yet applied, in name order, each in its own transaction."""
        applied: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            folder = resources.files("streamengine.store") / "migrations"
            for entry in sorted(folder.iterdir(), key=lambda e: e.name):
                if not entry.name.endswith(".sql") or entry.name in done:
                    continue
                await conn.execute(entry.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", entry.name)
                applied.append(entry.name)
        for name in applied:
            log.info("applied migration %s", name)
        return applied

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.pool.acquire() as conn:
            result: str = await conn.execute(query, *args)
            return result


def _safe_reason(exc: BaseException, url: str) -> str:
    text = str(exc) or type(exc).__name__
    password = urlsplit(url).password
    if password:
        text = text.replace(password, "***")
    return text.splitlines()[0]
