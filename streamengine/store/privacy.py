"""Deleting stored samples: the retention loop's batches and a user's forget request.

Both lock the windows they delete from (in id order, as ingest locks its open window) before looking at
the jobs, so a window that closes meanwhile is seen closed with its job. Retention never deletes from a
window whose job (training or Fisher) is queued or running: that job needs its samples. A forget request
deletes regardless (the user asked) and reports which jobs are running on them. Deleting from the open
window takes its counters down too, so its threshold and the tick count what is left; closed windows
keep their counters (what they held when they closed, as their released versions' manifests say).

A forget request also leaves a tombstone (the user id and the time), so that the user's events still in
Kafka, in flight or sent again are not stored again: ingest drops those made before it
(``windows.write_batch``). It locks the whole windows table first: the ingest batches in flight (each holds
its open window's row lock) commit before, and their samples are deleted; later ones wait, then see the
tombstone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from streamengine.store import rollouts
from streamengine.store.db import Database

_RETENTION_LOCK = 0x5E_0005
"""Advisory lock of the retention pass: with several replicas, one deletes at a time."""

_DUE = """
SELECT s.event_id, s.window_id FROM samples s
WHERE s.stored_at < now() - make_interval(days => $1)
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.window_id = s.window_id AND j.state IN ('queued', 'running'))
ORDER BY s.stored_at LIMIT $2
"""
_BUSY = "SELECT DISTINCT window_id FROM jobs WHERE window_id = ANY($1::bigint[]) AND state IN ('queued', 'running')"
# The window a version was trained on: its job's, or (a version without a job row) its manifest's.
_VERSIONS = """
SELECT a.model, a.version, a.deleted_at IS NOT NULL AS deleted,
       coalesce(j.window_id, (a.manifest -> 'window' ->> 'id')::bigint) AS window_id
FROM adapters a LEFT JOIN jobs j ON j.id = a.job_id
WHERE a.model = ANY($1::text[])
ORDER BY a.model, a.major, a.minor
"""


@dataclass(frozen=True, slots=True)
class AdapterRef:
    model: str
    version: str
    deleted: bool  # deleted from the registry and S3 since (a tombstone)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "deleted": self.deleted}


@dataclass(slots=True)
class Forgotten:
    """What a forget request deleted, and where the samples went before."""

    deleted_samples: int = 0
    windows: list[int] = field(default_factory=list)
    trained_on: list[AdapterRef] = field(default_factory=list)
    later_versions: list[AdapterRef] = field(default_factory=list)
    running_jobs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted_samples": self.deleted_samples,
            "windows": self.windows,
            "trained_on": [a.as_dict() for a in self.trained_on],
            "later_versions": [a.as_dict() for a in self.later_versions],
            "running_jobs": self.running_jobs,
        }


async def _lock_windows(conn: asyncpg.Connection, window_ids: list[int]) -> None:
    await conn.execute("SELECT 1 FROM windows WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", window_ids)


async def _delete(conn: asyncpg.Connection, where: str, arg: Any) -> list[asyncpg.Record]:
    """Delete samples; take the open window's counters down by what left it."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"DELETE FROM samples WHERE {where} RETURNING model, window_id, label, weight", arg
    )
    gone: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # trainable, their weight, all
    for r in rows:
        counts = gone[r["window_id"]]
        if r["label"] > 0 and r["weight"] > 0:
            counts[0] += 1
            counts[1] += r["weight"]
        counts[2] += 1
    for window_id, (trainable, weight, stored) in gone.items():
        await conn.execute(
            "UPDATE windows SET samples = greatest(samples - $2, 0),"
            " weight = CASE WHEN samples - $2 <= 0 THEN 0 ELSE greatest(weight - $3, 0) END,"
            " stored = greatest(stored - $4, 0) WHERE id = $1 AND state = 'open'",
            window_id,
            int(trainable),
            weight,
            int(stored),
        )
    return rows


async def expire_batch(db: Database, days: int, limit: int) -> int | None:
    """Delete up to ``limit`` samples stored more than ``days`` days ago (PostgreSQL's clock), oldest first,
    except those of windows with a queued or running job. None: another replica holds the retention lock."""
    async with db.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RETENTION_LOCK):
            return None
        due = await conn.fetch(_DUE, days, limit)
        if not due:
            return 0
        window_ids = sorted({r["window_id"] for r in due})
        await _lock_windows(conn, window_ids)
        busy = {r["window_id"] for r in await conn.fetch(_BUSY, window_ids)}  # closed since _DUE looked
        doomed = [r["event_id"] for r in due if r["window_id"] not in busy]
        return len(await _delete(conn, "event_id = ANY($1::text[])", doomed)) if doomed else 0


async def expire(db: Database, days: int, batch_size: int, max_batches: int = 10) -> int:
    """One retention pass: batches of ``batch_size`` (one transaction each) until none is left or
    ``max_batches`` ran (the rest waits for the next pass). The number of samples deleted."""
    total = 0
    for _ in range(max_batches):
        deleted = await expire_batch(db, days, batch_size)
        if deleted is None:
            break
        total += deleted
        if deleted < batch_size:
            break
    return total


async def forget_user(db: Database, user_id: str) -> Forgotten:
    """Delete every sample of ``user_id`` (all model lines), leave the user's tombstone, and report where the
    samples had gone."""
    result = Forgotten()
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE windows IN EXCLUSIVE MODE")  # waits for ingest's batches in flight
        await conn.execute(
            "INSERT INTO forgotten_users (user_id, forgotten_at) VALUES ($1, clock_timestamp())"
            " ON CONFLICT (user_id) DO UPDATE SET forgotten_at = excluded.forgotten_at",
            user_id,
        )
        await rollouts.forget(conn, user_id)  # the canary judgement's counts of the user's feedback
        placed = await conn.fetch("SELECT DISTINCT model, window_id FROM samples WHERE user_id = $1", user_id)
        if not placed:
            return result
        await _lock_windows(conn, sorted({r["window_id"] for r in placed}))
        rows = await _delete(conn, "user_id = $1", user_id)
        earliest: dict[str, int] = {}
        windows: set[int] = set()
        for r in rows:
            windows.add(r["window_id"])
            earliest[r["model"]] = min(earliest.get(r["model"], r["window_id"]), r["window_id"])
        result.deleted_samples = len(rows)
        result.windows = sorted(windows)
        for v in await conn.fetch(_VERSIONS, sorted(earliest)):
            ref = AdapterRef(v["model"], v["version"], v["deleted"])
            if v["window_id"] in windows:
                result.trained_on.append(ref)
            elif v["window_id"] is not None and v["window_id"] > earliest[v["model"]]:
                result.later_versions.append(ref)
        running = await conn.fetch(
            "SELECT j.id FROM jobs j JOIN (SELECT unnest($1::text[]) AS model, unnest($2::bigint[]) AS first) e"
            " ON e.model = j.model WHERE j.state = 'running' AND j.window_id >= e.first ORDER BY j.id",
            list(earliest),
            list(earliest.values()),
        )
        result.running_jobs = [r["id"] for r in running]
    return result
