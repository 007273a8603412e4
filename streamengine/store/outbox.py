"""The outbox table: events written in the same transaction as the state they announce, relayed later.

Every function takes the relay's connection, so the whole pass (lock, read, mark) is one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

_RELAY_LOCK = 0x5E_0002


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    key: str
    value: Any
    headers: dict[str, str]


async def lock_relay(conn: asyncpg.Connection) -> bool:
    """Take the relay's transaction-scoped advisory lock; False when another relay holds it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK))


async def pending(conn: asyncpg.Connection, limit: int) -> list[OutboxRow]:
    """The oldest ``limit`` rows not yet sent, in the order they were written."""
    rows = await conn.fetch(
        "SELECT id, topic, key, value, headers FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1", limit
    )
    return [OutboxRow(r["id"], r["topic"], r["key"], r["value"], r["headers"]) for r in rows]


async def mark_sent(conn: asyncpg.Connection, row_id: int) -> None:
    await conn.execute("UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = $1", row_id)


async def mark_failed(conn: asyncpg.Connection, row_id: int, error: str) -> None:
    await conn.execute("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1", row_id, error[:500])


async def backlog(conn: asyncpg.Connection) -> int:
    """Rows not yet sent."""
    return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
