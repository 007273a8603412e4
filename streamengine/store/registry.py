"""The adapter registry: immutable versions, moving aliases, deploy, rollback, deletion and GC.

Deploy and rollback publish AdapterReleased again (through the outbox, in the same transaction) so
every serving node converges on the latest record of its model; each announcement, a release's too, takes
the model line's next ``sequence``, so nodes tell a real rollback from a replayed old record. Deleting a
version keeps its row as a tombstone (``deleted_at``), so its number is never handed out again, and
removes its objects from S3. Anything an alias points to, and the parent of a queued or running job, is never deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from streamengine.contract.events import AdapterReleased
from streamengine.core.manifest import Signer
from streamengine.core.versions import Version, base_changed
from streamengine.errors import Conflict, NotFound
from streamengine.store import rollouts
from streamengine.store.db import Database
from streamengine.store.job_queue import announce, move_production
from streamengine.store.objects import ObjectStore

log = logging.getLogger(__name__)


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
    fisher_file: str | None = None
    fisher_sha256: str | None = None
    stage: str = "production"

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
            "fisher_file": self.fisher_file,
            "stage": self.stage,
        }


@dataclass(slots=True)
class Collection:
    """What a deletion or garbage collection removed (or, for a dry run, would remove)."""

    model: str
    deleted: list[str] = field(default_factory=list)  # registry versions, now tombstones
    orphans: list[str] = field(default_factory=list)  # S3 folders with no live registry row
    kept: list[str] = field(default_factory=list)
    objects: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "deleted": self.deleted,
            "orphans": self.orphans,
            "kept": self.kept,
            "objects": self.objects,
            "dry_run": self.dry_run,
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
        fisher_file=row["fisher_file"],
        fisher_sha256=row["fisher_sha256"],
        stage=row["stage"],
    )


async def list_adapters(db: Database, model: str) -> list[Adapter]:
    """Live (not deleted) versions of ``model``, newest first."""
    rows = await db.fetch(
        _SELECT + " WHERE a.model = $1 AND a.deleted_at IS NULL GROUP BY a.model, a.version"
        " ORDER BY a.major DESC, a.minor DESC",
        model,
    )
    return [_adapter(r) for r in rows]


async def get_adapter(db: Database, model: str, version: str) -> Adapter:
    """A version by name, or by alias (``production``, ``previous``, ``canary``)."""
    resolved = await db.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = $2", model, version)
    row = await db.fetchrow(
        _SELECT + " WHERE a.model = $1 AND a.version = $2 GROUP BY a.model, a.version", model, resolved or version
    )
    if row is None:
        raise NotFound(f"model '{model}' has no adapter version or alias '{version}'")
    if row["deleted_at"] is not None:
        raise NotFound(f"adapter {model} {row['version']} was deleted at {row['deleted_at'].isoformat()}")
    return _adapter(row)


async def alias(db: Database, model: str, name: str) -> str | None:
    version: str | None = await db.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = $2", model, name)
    return version


async def is_released(db: Database, model: str, version: str) -> bool:
    """True once ``version`` was ever released (deleted ones included): its objects are immutable."""
    return bool(await db.fetchval("SELECT 1 FROM adapters WHERE model = $1 AND version = $2", model, version))


async def base_model_changed(db: Database, model: str, configured_base: str) -> bool:
    """True when production's adapter was trained on another base model than ``configured_base``."""
    base = await db.fetchval(
        "SELECT a.manifest->>'base_model' FROM aliases al JOIN adapters a ON a.model = al.model"
        " AND a.version = al.version WHERE al.model = $1 AND al.alias = 'production'",
        model,
    )
    return base_changed(base, configured_base)


async def deploy(db: Database, model: str, version: str, topic: str, signer: Signer | None) -> AdapterReleased:
    """Make ``version`` the production adapter and announce it (reason ``manual``); a canary on trial is aborted."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        await rollouts.abort_running(conn, model, f"manual deploy of {version}", topic, signer)
        event = await announce(conn, model, version, "manual", topic, signer)
        await move_production(conn, model, version)
        await _production_stage(conn, model, version)
        return event


async def rollback(db: Database, model: str, topic: str, signer: Signer | None) -> AdapterReleased:
    """Swap ``production`` and ``previous`` and announce the restored version (reason ``rollback``); a canary on
    trial is aborted."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        previous = await conn.fetchval("SELECT version FROM aliases WHERE model = $1 AND alias = 'previous'", model)
        if previous is None:
            raise Conflict(f"model '{model}' has no previous version to roll back to")
        await rollouts.abort_running(conn, model, f"manual rollback to {previous}", topic, signer)
        event = await announce(conn, model, previous, "rollback", topic, signer)
        await move_production(conn, model, previous)
        await _production_stage(conn, model, previous)
        return event


async def _production_stage(conn: asyncpg.Connection, model: str, version: str) -> None:
    await conn.execute("UPDATE adapters SET stage = 'production' WHERE model = $1 AND version = $2", model, version)


# --- deletion and garbage collection ------------------------------------------------------------------
async def _protected(conn: asyncpg.Connection, model: str) -> dict[str, str]:
    """version -> why it must stay: an alias points to it, or an active job trains on top of it."""
    why: dict[str, str] = {}
    for row in await conn.fetch("SELECT alias, version FROM aliases WHERE model = $1", model):
        why.setdefault(row["version"], f"alias '{row['alias']}' points to it")
    for row in await conn.fetch(
        "SELECT id, parent_version FROM jobs WHERE model = $1 AND state IN ('queued', 'running')"
        " AND parent_version IS NOT NULL",
        model,
    ):
        why.setdefault(row["parent_version"], f"job {row['id']} trains on top of it")
    return why


async def delete_version(db: Database, store: ObjectStore, model: str, version: str) -> Collection:
    """Delete one version (registry tombstone + S3 objects); Conflict when it is protected."""
    Version.parse(version)
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        row = await conn.fetchrow("SELECT deleted_at FROM adapters WHERE model = $1 AND version = $2", model, version)
        if row is None:
            raise NotFound(f"model '{model}' has no adapter version '{version}'")
        reason = (await _protected(conn, model)).get(version)
        if reason:
            raise Conflict(f"adapter {model} {version} cannot be deleted: {reason}")
        await conn.execute(
            "UPDATE adapters SET deleted_at = coalesce(deleted_at, now()) WHERE model = $1 AND version = $2",
            model,
            version,
        )
    result = Collection(model, deleted=[version])
    result.objects = await store.adelete_version(model, version)
    log.info("deleted adapter %s %s (%d objects)", model, version, result.objects)
    return result


async def collect_garbage(db: Database, store: ObjectStore, model: str, keep: int, dry_run: bool = False) -> Collection:
    """Delete all but the ``keep`` newest live versions, never a protected one, and sweep S3 folders
    that no live registry row claims (failed uploads, leftovers of earlier deletions)."""
    if keep < 0:
        raise Conflict("keep must be 0 or more")
    result = Collection(model, dry_run=dry_run)
    # Phase 1: choose and tombstone (one transaction, the model line locked).
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        protected = await _protected(conn, model)
        live = [
            r["version"]
            for r in await conn.fetch(
                "SELECT version FROM adapters WHERE model = $1 AND deleted_at IS NULL ORDER BY major DESC, minor DESC",
                model,
            )
        ]
        for rank, version in enumerate(live):
            (result.kept if rank < keep or version in protected else result.deleted).append(version)
        if result.deleted and not dry_run:
            await conn.execute(
                "UPDATE adapters SET deleted_at = now() WHERE model = $1 AND version = ANY($2::text[])",
                model,
                result.deleted,
            )
    # Phase 2: remove objects, the model line locked so no job reserves a version being swept.
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        claimed = {
            r["version"]
            for r in await conn.fetch(
                "SELECT version FROM adapters WHERE model = $1 AND deleted_at IS NULL UNION SELECT version FROM jobs"
                " WHERE model = $1 AND version IS NOT NULL AND state IN ('queued', 'running')",
                model,
            )
        }
        stored = await store.alist_all_versions(model)
        sweep = [v for v in stored if v not in claimed and v not in result.deleted]
        result.orphans = sweep
        if not dry_run:
            for version in sorted(set(sweep) | (set(result.deleted) & set(stored)), key=Version.parse):
                result.objects += await store.adelete_version(model, version)
    log.info(
        "garbage collection of %s%s: deleted %s, swept %s, kept %s",
        model,
        " (dry run)" if dry_run else "",
        result.deleted or "-",
        result.orphans or "-",
        result.kept or "-",
    )
    return result


async def last_release_times(db: Database) -> dict[str, float]:
    """Unix time of each model line's newest version (for the last-release gauge)."""
    rows = await db.fetch("SELECT model, extract(epoch FROM max(created_at)) AS t FROM adapters GROUP BY model")
    return {r["model"]: float(r["t"]) for r in rows}
