"""The training job queue in PostgreSQL: claim with a lease, heartbeat, reserve a version, finish.

Workers claim under the model line's lock (``FOR UPDATE SKIP LOCKED``); a job whose lease expires (its
worker died) is claimed again. Lines with work take turns (the one whose last job started longest ago
first), so a line with a backlog does not hold the pool. Jobs of one model line run one at a time, oldest
window first, because each trains on top of the version the previous one released; while the line has a
canary on trial its training jobs wait (a candidate is never stacked on an unjudged version) and then train
from whatever production is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from streamengine.contract import cloudevents
from streamengine.contract.events import CANARY_TYPE, RELEASED_TYPE, AdapterCanary, AdapterReleased, ReleaseReason
from streamengine.core.job_states import JobState
from streamengine.core.manifest import Signer
from streamengine.core.release import canary_record, manifest_of, republish, sequenced
from streamengine.core.versions import Version, next_version
from streamengine.errors import Conflict, NotFound
from streamengine.store.db import Database

FISHER_FILE = "fisher.safetensors"
CLAIMABLE = "(state = 'queued' OR (state = 'running' AND lease_expires_at < now()))"
CANARY_RUNNING = "EXISTS (SELECT 1 FROM rollouts r WHERE r.model = {model} AND r.state = 'running')"
"""SQL: the model line has a canary on trial (its training jobs wait)."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    model: str
    window_id: int
    reason: str
    state: JobState
    attempts: int
    lease_owner: str | None
    version: str | None
    parent_version: str | None
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    kind: str = "train"
    target_version: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Job:
        return cls(**{name: row[name] for name in cls.__slots__})


async def _production(conn: asyncpg.Connection, model: str) -> str | None:
    version: str | None = await conn.fetchval(
        "SELECT version FROM aliases WHERE model = $1 AND alias = 'production'", model
    )
    return version


# Each line's head (its oldest unfinished job) when it can be claimed, lines taking turns: the line whose last job
# started longest ago (or never) first, then the oldest job. A line with a canary on trial waits with its training
# jobs, and a line whose head runs under a live lease waits for it: neither takes a place in the 16.
_HEADS = f"""
SELECT h.id, h.model, h.kind FROM (
    SELECT DISTINCT ON (model) id, model, kind, state, lease_expires_at FROM jobs
    WHERE state IN ('queued', 'running') ORDER BY model, id
) h
WHERE (h.state = 'queued' OR h.lease_expires_at < now())
    AND NOT (h.kind = 'train' AND {CANARY_RUNNING.format(model="h.model")})
ORDER BY (SELECT max(started_at) FROM jobs s WHERE s.model = h.model) NULLS FIRST, h.id
LIMIT 16
"""


async def claim(db: Database, owner: str, lease_s: float, max_attempts: int) -> Job | None:
    """Claim the oldest runnable job of the line whose turn it is (lines with work take turns: the one whose last
    job started longest ago first), never a second job of a line, or None."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = now(), lease_owner = NULL,"
            " error = 'worker lost (lease expired) on every one of ' || attempts || ' attempts'"
            " WHERE state = 'running' AND lease_expires_at < now() AND attempts >= $1",
            max_attempts,
        )
        for cand in await conn.fetch(_HEADS):
            line = await conn.fetchval(
                "SELECT model FROM model_lines WHERE model = $1 FOR UPDATE SKIP LOCKED", cand["model"]
            )
            if line is None:
                continue  # another worker is claiming for this model line right now
            # Under the line's lock: the head is still claimable and no other job of the line runs or comes first.
            head = await conn.fetchval(f"SELECT id FROM jobs WHERE id = $1 AND {CLAIMABLE} FOR UPDATE", cand["id"])
            busy = head is None or await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE model = $1 AND id <> $2 AND"
                " (state = 'running' AND lease_expires_at >= now() OR state = 'queued' AND id < $2)",
                cand["model"],
                cand["id"],
            )
            if not busy and cand["kind"] == "train":
                busy = await conn.fetchval(f"SELECT {CANARY_RUNNING.format(model='$1')}", cand["model"])
            if busy:
                continue
            row = await conn.fetchrow(
                "UPDATE jobs SET state = 'running', lease_owner = $2,"
                " lease_expires_at = now() + make_interval(secs => $3), attempts = attempts + 1,"
                " started_at = coalesce(started_at, now()), error = NULL,"
                " parent_version = $4"
                " WHERE id = $1 RETURNING *",
                cand["id"],
                owner,
                lease_s,
                await _production(conn, cand["model"]),
            )
            return Job.from_row(row)
    return None


async def heartbeat(db: Database, job_id: int, owner: str, lease_s: float, progress: dict[str, Any]) -> bool:
    """Extend the lease and store progress; False when the lease was lost to another worker."""
    status = await db.execute(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3), progress = $4"
        " WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        job_id,
        owner,
        lease_s,
        progress,
    )
    return status.endswith(" 1")


async def _owned(conn: asyncpg.Connection, job_id: int, owner: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", job_id)
    if row is None or row["state"] != "running" or row["lease_owner"] != owner:
        raise Conflict(f"job {job_id}: lease lost to another worker; its result is discarded")
    return row


async def reserve_version(db: Database, job_id: int, owner: str, major: bool = False) -> str:
    """The version this job will release, kept across retries so S3 paths stay stable."""
    async with db.pool.acquire() as conn, conn.transaction():
        job = await _owned(conn, job_id, owner)
        if job["version"]:
            return str(job["version"])
        await conn.fetchval("SELECT model FROM model_lines WHERE model = $1 FOR UPDATE", job["model"])
        taken = await conn.fetch(
            "SELECT version FROM adapters WHERE model = $1 UNION"
            " SELECT version FROM jobs WHERE model = $1 AND version IS NOT NULL AND state IN ('queued', 'running')",
            job["model"],
        )
        version = str(next_version([r["version"] for r in taken], major=major or bool(job["major"])))
        await conn.execute("UPDATE jobs SET version = $2 WHERE id = $1", job_id, version)
        return version


async def request_major(db: Database, job_id: int) -> None:
    """Make the job release the next major version (``vN+1.0``) instead of a minor bump."""
    await db.execute("UPDATE jobs SET major = true WHERE id = $1 AND version IS NULL", job_id)


@dataclass(frozen=True, slots=True)
class Canary:
    """Release to these nodes first (``rollout.canary_fraction``), announced on ``topic`` (``kafka.canary_topic``)."""

    nodes: list[str]
    topic: str


async def release(
    db: Database,
    job_id: int,
    owner: str,
    event: AdapterReleased,
    topic: str,
    signer: Signer | None,
    canary: Canary | None = None,
) -> AdapterReleased:
    """Record the adapter, move the aliases, queue the event and finish the job, in one transaction.

    The event is queued with the model line's next release sequence, signed again; returns it as queued. With
    ``canary`` (and a production version to compare with), the version goes on trial instead: the ``canary``
    alias, a ``rollouts`` row and an AdapterCanary record on ``canary.topic``; production stays as it is."""
    manifest = manifest_of(event)
    async with db.pool.acquire() as conn, conn.transaction():
        job = await _owned(conn, job_id, owner)
        # The model line's lock, as deploy and rollback take it, before production is read: the aliases move
        # one transaction at a time whatever the order of the statements below.
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", job["model"])
        announced = sequenced(event, await next_sequence(conn, job["model"]), signer)
        version = Version.parse(manifest["version"])
        production = await _production(conn, job["model"])
        trial = canary if canary is not None and canary.nodes and production is not None else None
        await conn.execute(
            "INSERT INTO adapters (model, version, major, minor, parent_version, job_id, uri, size_bytes,"
            " manifest, fisher_file, fisher_sha256, stage) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            job["model"],
            str(version),
            version.major,
            version.minor,
            manifest.get("parent_version"),
            job_id,
            manifest["uri"],
            manifest["size_bytes"],
            manifest,
            FISHER_FILE if FISHER_FILE in manifest["files"] else None,
            manifest["files"].get(FISHER_FILE),
            "production" if trial is None else "canary",
        )
        if trial is None:
            await move_production(conn, job["model"], str(version))
            await enqueue_release(conn, topic, announced)
        else:
            assert production is not None
            await _start_canary(conn, announced, production, trial, signer)
        await conn.execute(
            "UPDATE jobs SET state = 'released', finished_at = now(), lease_owner = NULL, metrics = $2 WHERE id = $1",
            job_id,
            manifest.get("metrics", {}),
        )
    return announced


async def _start_canary(
    conn: asyncpg.Connection, event: AdapterReleased, production: str, canary: Canary, signer: Signer | None
) -> None:
    """Put ``event``'s version on trial: its record goes to the canary topic only, with the release's sequence."""
    assert event.sequence is not None
    await set_alias(conn, event.model, "canary", event.version)
    await conn.execute(
        "INSERT INTO rollouts (model, version, production_version, canary_nodes, canary_topic)"
        " VALUES ($1, $2, $3, $4, $5)",
        event.model,
        event.version,
        production,
        canary.nodes,
        canary.topic,
    )
    record = canary_record(
        event,
        stage="canary",
        nodes=canary.nodes,
        production=production,
        outcome=None,
        now=event.created_at,
        signer=signer,
        sequence=event.sequence,
    )
    await enqueue_canary(conn, canary.topic, record)


async def announce(
    conn: asyncpg.Connection, model: str, version: str, reason: ReleaseReason, topic: str, signer: Signer | None
) -> AdapterReleased:
    """Queue ``version`` announced again, with the model line's next sequence (so nodes take it as newer)."""
    row = await conn.fetchrow(
        "SELECT manifest, deleted_at FROM adapters WHERE model = $1 AND version = $2", model, version
    )
    if row is None:
        raise NotFound(f"model '{model}' has no adapter version '{version}'")
    if row["deleted_at"] is not None:
        raise Conflict(f"adapter {model} {version} was deleted; it cannot be deployed")
    stored = AdapterReleased(event_id="-", **row["manifest"])
    event = republish(stored, reason, datetime.now(UTC), signer, await next_sequence(conn, model))
    await enqueue_release(conn, topic, event)
    return event


async def next_sequence(conn: asyncpg.Connection, model: str) -> int:
    """The model line's next release sequence (its row stays locked until the transaction ends).

    One more than the last, or the database clock in milliseconds when that is larger: it only grows, and a
    registry restored from a backup or created afresh still numbers above what nodes served before."""
    sequence: int = await conn.fetchval(
        "UPDATE model_lines SET release_sequence = greatest(release_sequence + 1,"
        " floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) WHERE model = $1 RETURNING release_sequence",
        model,
    )
    return sequence


async def enqueue_release(conn: asyncpg.Connection, topic: str, event: AdapterReleased) -> None:
    """Queue ``event`` for ``topic`` (keyed by its model, with its CloudEvents headers)."""
    headers = cloudevents.headers(event.event_id, RELEASED_TYPE, event.created_at)
    await enqueue(conn, topic, event.model, event.model_dump(mode="json"), headers)


async def enqueue_canary(conn: asyncpg.Connection, topic: str, record: AdapterCanary) -> None:
    """Queue an AdapterCanary record for ``topic`` (keyed by its model, with its CloudEvents headers)."""
    headers = cloudevents.headers(record.event_id, CANARY_TYPE, record.created_at)
    await enqueue(conn, topic, record.model, record.model_dump(mode="json"), headers)


async def set_alias(conn: asyncpg.Connection, model: str, alias: str, version: str) -> None:
    await conn.execute(
        "INSERT INTO aliases (model, alias, version) VALUES ($1, $2, $3)"
        " ON CONFLICT (model, alias) DO UPDATE SET version = $3, updated_at = now()",
        model,
        alias,
        version,
    )


async def move_production(conn: asyncpg.Connection, model: str, version: str) -> None:
    """production := version, previous := the old production (when it differs)."""
    current = await _production(conn, model)
    if current and current != version:
        await set_alias(conn, model, "previous", current)
    await set_alias(conn, model, "production", version)


async def enqueue(
    conn: asyncpg.Connection, topic: str, key: str, value: dict[str, Any], headers: dict[str, str]
) -> None:
    await conn.execute(
        "INSERT INTO outbox (topic, key, value, headers) VALUES ($1, $2, $3, $4)", topic, key, value, headers
    )


async def finish_unreleased(
    db: Database,
    job_id: int,
    owner: str,
    state: JobState,
    error: str,
    metrics: dict[str, Any] | None = None,
    retry: bool = False,
    max_attempts: int | None = 1,
) -> JobState:
    """End a job without a release: ``rejected`` (gate) or ``failed``; a retryable failure re-queues
    it while attempts remain (always, when ``max_attempts`` is None). Returns the state the job is left in."""
    async with db.pool.acquire() as conn, conn.transaction():
        job = await _owned(conn, job_id, owner)
        new_state: JobState = "queued" if retry and (max_attempts is None or job["attempts"] < max_attempts) else state
        await conn.execute(
            "UPDATE jobs SET state = $2, error = $3, metrics = $4, lease_owner = NULL, lease_expires_at = NULL,"
            " finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END WHERE id = $1",
            job_id,
            new_state,
            error,
            metrics or {},
        )
        return new_state


async def list_jobs(db: Database, model: str | None = None, limit: int = 50) -> list[Job]:
    rows = await db.fetch(
        "SELECT * FROM jobs WHERE $1::text IS NULL OR model = $1 ORDER BY id DESC LIMIT $2", model, limit
    )
    return [Job.from_row(r) for r in rows]


async def count_by_state(db: Database, model: str) -> dict[str, int]:
    """How many jobs of ``model`` are in each state (states without jobs are absent)."""
    rows = await db.fetch("SELECT state, count(*) AS n FROM jobs WHERE model = $1 GROUP BY state", model)
    return {r["state"]: r["n"] for r in rows}


async def enqueue_fisher(db: Database, model: str, version: str) -> int:
    """Queue a job that computes and stores the Fisher of released ``version``; returns its id."""
    async with db.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT manifest -> 'window' ->> 'id' AS window_id FROM adapters"
            " WHERE model = $1 AND version = $2 AND deleted_at IS NULL",
            model,
            version,
        )
        if row is None:
            raise NotFound(f"model '{model}' has no released version '{version}'")
        if row["window_id"] is None:
            raise Conflict(f"{model} {version} records no training window to compute its Fisher on")
        job_id: int = await conn.fetchval(
            "INSERT INTO jobs (model, window_id, reason, kind, target_version) VALUES ($1, $2, 'manual', 'fisher', $3)"
            " RETURNING id",
            model,
            int(row["window_id"]),
            version,
        )
        return job_id


async def finish_fisher(db: Database, job_id: int, owner: str, model: str, version: str, name: str, sha: str) -> None:
    """Point the registry at a version's new Fisher file and mark the job done, in one transaction."""
    async with db.pool.acquire() as conn, conn.transaction():
        await _owned(conn, job_id, owner)
        await conn.execute(
            "UPDATE adapters SET fisher_file = $3, fisher_sha256 = $4 WHERE model = $1 AND version = $2",
            model,
            version,
            name,
            sha,
        )
        await conn.execute(
            "UPDATE jobs SET state = 'done', finished_at = now(), lease_owner = NULL, metrics = $2 WHERE id = $1",
            job_id,
            {"fisher_file": name, "fisher_sha256": sha},
        )


async def give_back(db: Database, job_id: int, owner: str) -> None:
    """Return a job this worker holds to the queue at once (a clean stop), without using up an attempt."""
    await db.execute(
        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL,"
        " attempts = greatest(attempts - 1, 0) WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        job_id,
        owner,
    )


@dataclass(frozen=True, slots=True)
class StateSummary:
    """How many jobs are in one state, and the age of the oldest (running jobs: since they started)."""

    count: int
    oldest_age_s: float


async def state_summary(db: Database) -> dict[str, StateSummary]:
    """Jobs of every model line by state (states without jobs are absent)."""
    rows = await db.fetch(
        "SELECT state, count(*) AS n, extract(epoch FROM now() - min(CASE WHEN state = 'running'"
        " THEN coalesce(started_at, created_at) ELSE created_at END)) AS age FROM jobs GROUP BY state"
    )
    return {r["state"]: StateSummary(r["n"], float(r["age"])) for r in rows}
