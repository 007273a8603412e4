"""PostgreSQL connection pool and schema migrations (asyncpg)."""

from __future__ import annotations

import json
import logging
import ssl
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from streamengine.config.settings import DatabaseSettings
from streamengine.core.masking import dsn_passwords, redact, target
from streamengine.errors import ConfigError, ServiceUnavailable

log = logging.getLogger(__name__)

# Any value; serialises concurrent migrations of several replicas starting at once.
_MIGRATION_LOCK = 0x5E_0001


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """Owns the pool; repositories (ingest, jobs, registry, outbox) borrow connections from it."""

    def __init__(
        self, pool: asyncpg.Pool, target: str, passwords: list[str] | None = None, dsn: str | None = None
    ) -> None:
        self.pool = pool
        self.target = target
        self._passwords = passwords or []
        self._dsn = dsn  # the pool's, TLS options included: for connections of their own

    @classmethod
    async def connect(cls, settings: DatabaseSettings, migrate: bool = True) -> Database:
        url = settings.url.get_secret_value()
        where, passwords = target(url), dsn_passwords(url)
        dsn = _with_tls(settings)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=settings.pool_min,
                max_size=settings.pool_max,
                init=_init_connection,
                timeout=10,
            )
        except ssl.SSLError as exc:
            reason = f"TLS failed: {_safe_reason(exc, passwords)} (check database.sslmode and database.ca_file)"
            raise ServiceUnavailable("PostgreSQL", where, reason) from None
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ServiceUnavailable("PostgreSQL", where, _safe_reason(exc, passwords)) from None
        except (asyncpg.InterfaceError, ValueError) as exc:  # asyncpg cannot use the DSN (scheme, port, option)
            reason = _safe_reason(exc, passwords)
            raise ConfigError(
                f"database.url (STREAMENGINE_DATABASE__URL) is not a usable PostgreSQL DSN: {reason}"
            ) from None
        db = cls(pool, where, passwords, dsn)
        if migrate:
            await db.migrate()
        return db

    async def close(self) -> None:
        await self.pool.close()

    async def connect_one(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool (one that LISTENs: :mod:`streamengine.store.notify`)."""
        if self._dsn is None:
            raise ServiceUnavailable("PostgreSQL", self.target, "no DSN to open a connection of its own with")
        try:
            return await asyncpg.connect(self._dsn, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ServiceUnavailable("PostgreSQL", self.target, _safe_reason(exc, self._passwords)) from None

    async def ping(self) -> None:
        try:
            async with self.pool.acquire(timeout=5) as conn:
                await conn.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ServiceUnavailable("PostgreSQL", self.target, _safe_reason(exc, self._passwords)) from None

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


def _with_tls(settings: DatabaseSettings) -> str:
    """database.url with database.sslmode and ca_file as its ``sslmode=`` and ``sslrootcert=`` (they win)."""
    url = settings.url.get_secret_value()
    tls = {"sslmode": settings.sslmode, "sslrootcert": str(settings.ca_file) if settings.ca_file else None}
    given = {name: value for name, value in tls.items() if value}
    if not given:
        return url
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name not in given]
    return urlunsplit(parts._replace(query=urlencode([*query, *given.items()])))


def _safe_reason(exc: BaseException, passwords: list[str]) -> str:
    """The first line of an error, the DSN's passwords masked (asyncpg quotes parts of a bad DSN)."""
    text = redact(str(exc).strip() or type(exc).__name__, passwords)
    return text.splitlines()[0]
