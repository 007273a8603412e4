"""Samples and windows in PostgreSQL: idempotent batch writes, exactly-once window closing.

Every write locks the model line's open window row, so any number of ingest replicas serialise on
it: a window closes once, and the job row is created in the same transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from streamengine.contract.events import WindowSpec
from streamengine.core.samples import Sample
from streamengine.core.windows import Schedule, WindowPolicy, cut_points
from streamengine.errors import NotFound, StreamEngineError
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


@dataclass(frozen=True, slots=True)
class OpenWindow:
    id: int
    samples: int
    """Trainable samples."""
    weight: float
    stored: int
    """All samples stored, trainable or not."""
    opened_at: datetime


@dataclass(slots=True)
class BatchOutcome:
    inserted: int = 0
    duplicates: int = 0
    closed: list[ClosedWindow] = field(default_factory=list)


COPY_COLUMNS = (
    "window_id", "event_id", "model", "kind", "prompt", "completion", "weight", "label", "user_id", "session_id",
    "adapter_version", "event_time", "source_partition", "source_offset", "holdout",
)  # fmt: skip
"""Columns of a sample's COPY line: the window id (known only under the window's lock), then :func:`copy_line`."""

_STORED = "SELECT event_id FROM samples WHERE event_id = ANY($1::text[])"


def _text(value: str) -> str:
    """A value in COPY's text format: backslash, tab, newline and carriage return escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def _optional(value: str | None) -> str:
    return "\\N" if value is None else _text(value)


def copy_line(row: SampleAt) -> str:
    """A sample in PostgreSQL's COPY text format, all columns after ``window_id`` (pure CPU work, so a
    consumer can prepare the next batch's lines while the previous batch is being written)."""
    sample, partition, offset = row
    when = sample.event_time
    if when is not None and when.tzinfo is None:
        when = when.astimezone(UTC)  # a naive time is the local time, as asyncpg's own encoding reads it
    return "\t".join(
        (
            _text(sample.event_id),
            _text(sample.model),
            _text(sample.kind),
            _text(sample.prompt),  # JSON text, parsed into the jsonb column
            _text(sample.completion),
            repr(sample.weight),
            str(sample.label),
            _optional(sample.user_id),
            _optional(sample.session_id),
            _optional(sample.adapter_version),
            "\\N" if when is None else when.isoformat(),
            "\\N" if partition is None else str(partition),
            "\\N" if offset is None else str(offset),
            "t" if sample.holdout else "f",
        )
    )


class ConcurrentInsert(StreamEngineError):
    """A sample of the batch was stored by another transaction meanwhile (another model line's writer, as
    writers of one model line take turns on its window): the batch is retried."""


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


def _merge_offsets(first: dict[str, int], last: dict[str, int], rows: list[SampleAt]) -> None:
    for _, partition, offset in rows:
        if partition is None or offset is None:
            continue
        key = str(partition)
        first[key] = min(first.get(key, offset), offset)
        last[key] = max(last.get(key, offset), offset)


async def write_batch(
    db: Database, rows: list[SampleAt], policy: WindowPolicy, lines: list[str] | None = None
) -> BatchOutcome:
    """Store samples (duplicates by event_id are dropped) and close windows that reach the policy.

    One transaction and a handful of statements per model line, whatever the batch size. The first copy
    of an event id in the batch wins. Samples already stored are found first (under the window's lock),
    so every new sample is written once, with COPY, straight into the window it belongs to. ``lines``:
    the rows' :func:`copy_line`, when the caller prepared them.
    """
    outcome = BatchOutcome()
    if lines is None:
        lines = [copy_line(row) for row in rows]
    by_model: dict[str, list[tuple[SampleAt, str]]] = {}
    seen: set[str] = set()
    for row, line in zip(rows, lines, strict=True):
        event_id = row[0].event_id
        if event_id in seen:
            outcome.duplicates += 1
            continue
        seen.add(event_id)
        by_model.setdefault(row[0].model, []).append((row, line))
    async with db.pool.acquire() as conn, conn.transaction():
        for model in sorted(by_model):  # fixed lock order: no deadlocks between replicas
            group = by_model[model]
            window = await _lock_open_window(conn, model)
            stored = {r[0] for r in await conn.fetch(_STORED, [row[0].event_id for row, _ in group])}
            fresh = [item for item in group if item[0][0].event_id not in stored] if stored else group
            outcome.duplicates += len(group) - len(fresh)
            if fresh:
                await _store(conn, window, fresh, policy, outcome)
    return outcome


async def _insert(conn: asyncpg.Connection, window_id: int, items: list[tuple[SampleAt, str]]) -> None:
    prefix = f"{window_id}\t"
    data = (prefix + f"\n{prefix}".join([line for _, line in items]) + "\n").encode()

    async def source() -> AsyncIterator[bytes]:
        yield data

    try:
        status = await conn.copy_to_table("samples", source=source(), columns=COPY_COLUMNS, format="text")
    except asyncpg.UniqueViolationError:
        raise ConcurrentInsert(f"a sample of the batch of {len(items)} was stored concurrently") from None
    copied = int(status.rsplit(" ", 1)[-1])  # "COPY <rows>"
    if copied != len(items):
        raise StreamEngineError(f"COPY stored {copied} of {len(items)} samples")


async def _store(
    conn: asyncpg.Connection,
    window: asyncpg.Record,
    items: list[tuple[SampleAt, str]],
    policy: WindowPolicy,
    outcome: BatchOutcome,
) -> None:
    """Insert new samples into the open window, closing it (and opening the next) exactly at the threshold."""
    cuts = cut_points(window["samples"], window["weight"], [(r[0].trainable, r[0].weight) for r, _ in items], policy)
    bounds = [0, *cuts, len(items)]
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        segment = items[start:end]
        if number > 0:
            if not segment:
                break
            window = await _lock_open_window(conn, window["model"])
        await _insert(conn, window["id"], segment)
        rows = [row for row, _ in segment]
        trainable = [s for s, _, _ in rows if s.trainable]
        first, last = dict(window["first_offsets"]), dict(window["last_offsets"])
        _merge_offsets(first, last, rows)
        window = await conn.fetchrow(
            "UPDATE windows SET samples = samples + $2, weight = weight + $3, stored = stored + $4,"
            " first_offsets = $5, last_offsets = $6 WHERE id = $1 RETURNING *",
            window["id"],
            len(trainable),
            sum(s.weight for s in trainable),
            len(segment),
            first,
            last,
        )
        outcome.inserted += len(segment)
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


async def open_window(db: Database, model: str) -> OpenWindow | None:
    """The open window of ``model``, read without locking it; None when none is open (the next write opens one)."""
    row = await db.fetchrow(
        "SELECT id, samples, weight, stored, opened_at FROM windows WHERE model = $1 AND state = 'open'", model
    )
    return OpenWindow(**dict(row)) if row else None


async def last_tick(db: Database, model: str) -> datetime | None:
    """When the cron tick of ``model`` last fired (None before the model line's first write)."""
    last: datetime | None = await db.fetchval("SELECT last_tick_at FROM model_lines WHERE model = $1", model)
    return last


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


async def open_window_fill(db: Database) -> dict[str, tuple[int, float]]:
    """Samples and weight of every open window, by model line (for the gauges)."""
    rows = await db.fetch("SELECT model, samples, weight FROM windows WHERE state = 'open'")
    return {r["model"]: (r["samples"], r["weight"]) for r in rows}


async def database_now(db: Database) -> datetime:
    """PostgreSQL's clock: the one every tick decision uses, whatever the replicas' clocks say."""
    now: datetime = await db.fetchval("SELECT now()")
    return now

