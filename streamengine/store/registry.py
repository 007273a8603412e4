"""The adapter registry: immutable versions, moving aliases, deploy and rollback.

Deploy and rollback publish AdapterReleased again (through the outbox, in the same transaction) so
every serving node converges on the latest record of its model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from streamengine.core.release import republish
from streamengine.errors import Conflict, NotFound
from streamengine.events import RELEASED_TYPE, AdapterReleased, ReleaseReason
from streamengine.store.db import Database
from streamengine.store.jobs import enqueue, move_production
from streamengine.stream import cloudevents


@dataclass(frozen=True, slots=True)
class Adapter:
    model: str
    version: str
    parent_version: str | None
    uri: str
    size_bytes: int
    manifest: dict[str, Any]
    created_at: datetime
    aliases: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "parent_version": self.parent_version,
            "uri": self.uri,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at.isoformat(),
            "aliases": list(self.aliases),
            "metrics": self.manifest.get("metrics", {}),
            "reason": self.manifest.get("reason"),
            "window": self.manifest.get("window"),
        }


_SELECT = """
SELECT a.*, coalesce(array_agg(al.alias ORDER BY al.alias) FILTER (WHERE al.alias IS NOT NULL), '{}') AS alias_names
FROM adapters a LEFT JOIN aliases al ON al.model = a.model AND al.version = a.version
"""


def _adapter(row: asyncpg.Record) -> Adapter:
    return Adapter(
        model=row["model"],
        version=row["version"],
        parent_version=row["parent_version"],
        uri=row["uri"],
        size_bytes=row["size_bytes"],
        manifest=row["manifest"],
        created_at=row["created_at"],
        aliases=tuple(row["alias_names"]),
    )


async def list_adapters(db: Database, model: str) -> list[Adapter]:
    rows = await db.fetch(
        _SELECT + " WHERE a.model = $1 GROUP BY a.model, a.version ORDER BY a.major DESC, a.minor DESC", model
    )
    return [_adapter(r) for r in rows]


async def get_adapter(db: Database, model: str, version: str) -> Adapter:
    """A version by name, or by alias (``production``, ``previous``)."""
    resolved = await db.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = $2", model, version)
    row = await db.fetchrow(
        _SELECT + " WHERE a.model = $1 AND a.version = $2 GROUP BY a.model, a.version", model, resolved or version
    )
    if row is None:
        raise NotFound(f"model '{model}' has no adapter version or alias '{version}'")
    return _adapter(row)


async def alias(db: Database, model: str, name: str) -> str | None:
    version: str | None = await db.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = $2", model, name)
    return version


async def _announce(
    conn: asyncpg.Connection, model: str, version: str, reason: ReleaseReason, topic: str, signing_key: str | None
) -> AdapterReleased:
    manifest = await conn.fetchval("SELECT manifest FROM adapters WHERE model = $1 AND version = $2", model, version)
    if manifest is None:
        raise NotFound(f"model '{model}' has no adapter version '{version}'")
    event = republish(AdapterReleased(event_id="-", **manifest), reason, datetime.now(UTC), signing_key)
    await enqueue(
        conn,
        topic,
        model,
        event.model_dump(mode="json"),
        cloudevents.headers(event.event_id, RELEASED_TYPE, event.created_at),
    )
    return event


async def deploy(db: Database, model: str, version: str, topic: str, signing_key: str | None) -> AdapterReleased:
    """Make ``version`` the production adapter and announce it (reason ``manual``)."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        event = await _announce(conn, model, version, "manual", topic, signing_key)
        await move_production(conn, model, version)
        return event


async def rollback(db: Database, model: str, topic: str, signing_key: str | None) -> AdapterReleased:
    """Swap ``production`` and ``previous`` and announce the restored version (reason ``rollback``)."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        previous = await conn.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = 'previous'", model)
        if previous is None:
            raise Conflict(f"model '{model}' has no previous version to roll back to")
        event = await _announce(conn, model, previous, "rollback", topic, signing_key)
        await move_production(conn, model, previous)
        return event
