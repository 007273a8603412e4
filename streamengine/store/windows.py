"""Samples and windows in PostgreSQL: idempotent batch writes, exactly-once window closing.

Every write locks the model line's open window row, so any number of ingest replicas serialise on
it: a window closes once, and the job row is created in the same transaction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from streamengine.core.samples import Sample
from streamengine.core.windows import Schedule, WindowPolicy, cut_points
from streamengine.errors import NotFound
from streamengine.events import WindowSpec
from streamengine.store.db import Database

SampleAt = tuple[Sample, int | None, int | None]
"""A sample with the partition and offset of the record it came from."""


@dataclass(slots=True)
class ClosedWindow:
    model: str
    window_id: int
    job_id: int
    reason: str
    samples: int
    weight: float


@dataclass(slots=True)
class BatchOutcome:
    inserted: int = 0
    duplicates: int = 0
    closed: list[ClosedWindow] = field(default_factory=list)


_INSERT = """
INSERT INTO samples (event_id, model, window_id, kind, prompt, completion, weight, label, user_id,
                     session_id, adapter_version, event_time, source_partition, source_offset, holdout)
SELECT e, $2, $1, k, p::jsonb, c, w, l, u, s, a, t, sp, so, h
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::float8[], $8::int2[], $9::text[],
            $10::text[], $11::text[], $12::timestamptz[], $13::int4[], $14::int8[], $15::bool[])
     WITH ORDINALITY AS x(e, k, p, c, w, l, u, s, a, t, sp, so, h, n)
ORDER BY n
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, weight, label, source_partition, source_offset
"""


async def _lock_open_window(conn: asyncpg.Connection, model: str) -> asyncpg.Record:
    query = "SELECT * FROM windows WHERE model = $1 AND state = 'open' FOR UPDATE"
    row: asyncpg.Record | None = await conn.fetchrow(query, model)
    if row is None:  # first sample of the model line, or the last window just closed
        await conn.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", model)
        await conn.execute(
            "INSERT INTO windows (model) VALUES ($1) ON CONFLICT (model) WHERE state = 'open' DO NOTHING", model
        )
        row = await conn.fetchrow(query, model)
    assert row is not None
    return row


async def _close(conn: asyncpg.Connection, window: asyncpg.Record, reason: str) -> ClosedWindow:
    await conn.execute(
        "UPDATE windows SET state = 'closed', closed_at = now(), close_reason = $2 WHERE id = $1",
        window["id"],
        reason,
    )
    job_id = await conn.fetchval(
        "INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, $3) RETURNING id",
        window["model"],
        window["id"],
        reason,
    )
    return ClosedWindow(window["model"], window["id"], job_id, reason, window["samples"], window["weight"])


def _merge_offsets(first: dict[str, int], last: dict[str, int], rows: list[Any]) -> None:
    for row in rows:
        partition, offset = row["source_partition"], row["source_offset"]
        if partition is None or offset is None:
            continue
        key = str(partition)
        first[key] = min(first.get(key, offset), offset)
        last[key] = max(last.get(key, offset), offset)


async def write_batch(db: Database, rows: list[SampleAt], policy: WindowPolicy) -> BatchOutcome:
    """Store samples (duplicates by event_id are dropped) and close windows that reach the policy.

    One transaction and a handful of statements per model line, whatever the batch size.
    """
    outcome = BatchOutcome()
    by_model: dict[str, list[SampleAt]] = {}
    for row in rows:
        by_model.setdefault(row[0].model, []).append(row)
    async with db.pool.acquire() as conn, conn.transaction():
        for model in sorted(by_model):  # fixed lock order: no deadlocks between replicas
            group = by_model[model]
            window = await _lock_open_window(conn, model)
            samples = [s for s, _, _ in group]
            inserted = await conn.fetch(
                _INSERT,
                window["id"],
                model,
                [s.event_id for s in samples],
                [s.kind for s in samples],
                [s.prompt for s in samples],
                [s.completion for s in samples],
                [s.weight for s in samples],
                [s.label for s in samples],
                [s.user_id for s in samples],
                [s.session_id for s in samples],
                [s.adapter_version for s in samples],
                [s.event_time for s in samples],
                [p for _, p, _ in group],
                [o for _, _, o in group],
                [s.holdout for s in samples],
            )
            outcome.inserted += len(inserted)
            outcome.duplicates += len(group) - len(inserted)
            if inserted:
                await _account(conn, window, _in_batch_order(inserted, samples), policy, outcome)
    return outcome


def _in_batch_order(inserted: list[asyncpg.Record], samples: list[Sample]) -> list[asyncpg.Record]:
    position = {s.event_id: i for i, s in enumerate(samples)}
    return sorted(inserted, key=lambda r: position[r["event_id"]])


async def _account(
    conn: asyncpg.Connection,
    window: asyncpg.Record,
    rows: list[asyncpg.Record],
    policy: WindowPolicy,
    outcome: BatchOutcome,
) -> None:
    """Add new samples to the open window, closing it (and opening the next) exactly at the threshold."""
    items = [(r["label"] > 0 and r["weight"] > 0, r["weight"]) for r in rows]
    cuts = cut_points(window["samples"], window["weight"], items, policy)
    bounds = [0, *cuts, len(rows)]
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        segment = rows[start:end]
        if number > 0:
            if not segment:
                break
            window = await _lock_open_window(conn, window["model"])
            await conn.execute(
                "UPDATE samples SET window_id = $1 WHERE event_id = ANY($2::text[])",
                window["id"],
                [r["event_id"] for r in segment],
            )
        trainable = [r for r in segment if r["label"] > 0 and r["weight"] > 0]
        first, last = dict(window["first_offsets"]), dict(window["last_offsets"])
        _merge_offsets(first, last, segment)
        window = await conn.fetchrow(
            "UPDATE windows SET samples = samples + $2, weight = weight + $3, stored = stored + $4,"
            " first_offsets = $5, last_offsets = $6 WHERE id = $1 RETURNING *",
            window["id"],
            len(trainable),
            sum(r["weight"] for r in trainable),
            len(segment),
            first,
            last,
        )
        if number < len(cuts):
            outcome.closed.append(await _close(conn, window, "threshold"))


async def close_now(db: Database, model: str, reason: str, min_samples: int = 1) -> ClosedWindow | None:
    """Close the open window of ``model`` (manual train, tick) when it holds ``min_samples``."""
    async with db.pool.acquire() as conn, conn.transaction():
        window = await _lock_open_window(conn, model)
        if window["samples"] < min_samples:
            return None
        return await _close(conn, window, reason)


async def tick(db: Database, model: str, schedule: Schedule, now: datetime, min_samples: int) -> ClosedWindow | None:
    """Fire the cron tick for ``model`` once if a fire time passed since the last tick.

    The model line row is locked, so with several replicas exactly one fires; a tick missed while
    everything was down fires once at the next call.
    """
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", model)
        last = await conn.fetchval("SELECT last_tick_at FROM model_lines WHERE model = $1 FOR UPDATE", model)
        if not schedule.is_due(last, now):
            return None
        await conn.execute("UPDATE model_lines SET last_tick_at = $2 WHERE model = $1", model, now)
        window = await _lock_open_window(conn, model)
        if window["samples"] < min_samples:
            return None
        return await _close(conn, window, "schedule")


async def get_window(db: Database, window_id: int) -> WindowSpec:
    row = await db.fetchrow("SELECT * FROM windows WHERE id = $1", window_id)
    if row is None:
        raise NotFound(f"window {window_id} does not exist")
    return WindowSpec(
        id=row["id"],
        samples=row["samples"],
        weight=row["weight"],
        first_offsets=row["first_offsets"],
        last_offsets=row["last_offsets"],
        start=row["opened_at"],
        end=row["closed_at"],
    )
