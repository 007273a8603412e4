"""Samples and windows in PostgreSQL: idempotent batch writes, exactly-once window closing.

Every write locks the model line's open window row, so any number of ingest replicas serialise on
it: a window closes once, and the job row is created in the same transaction. That lock is also what a
forget request waits for (``privacy.forget_user`` locks the windows table): a batch either commits before
the forget, which then deletes its samples, or reads the user's tombstone after it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter, itemgetter

import asyncpg
import msgspec

from streamengine.contract.events import WindowSpec
from streamengine.core.rollout import Outcome
from streamengine.core.samples import Sample
from streamengine.core.windows import Schedule, WindowPolicy, cut_points
from streamengine.errors import NotFound, StreamEngineError
from streamengine.store import rollouts
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
    forgotten: int = 0
    """Samples of users forgotten after the events were made (``privacy.forget_user``): dropped."""
    closed: list[ClosedWindow] = field(default_factory=list)
    open_samples: dict[str, int] = field(default_factory=dict)
    """Trainable samples in each written line's open window after the batch (how close it is to closing)."""
    inserted_by_model: dict[str, int] = field(default_factory=dict)
    """``inserted`` by model line."""

    def add(self, other: BatchOutcome) -> None:
        self.inserted += other.inserted
        for model, count in other.inserted_by_model.items():
            self.inserted_by_model[model] = self.inserted_by_model.get(model, 0) + count
        self.duplicates += other.duplicates
        self.forgotten += other.forgotten
        self.closed += other.closed
        self.open_samples.update(other.open_samples)


COPY_COLUMNS = (
    "window_id", "event_id", "model", "kind", "prompt", "completion", "weight", "label", "user_id", "session_id",
    "adapter_version", "event_time", "source_partition", "source_offset", "holdout",
)  # fmt: skip
"""Columns of a sample's COPY line: the window id (known only under the window's lock), then :func:`copy_line`."""

# Samples already stored and the tombstones of the batch's users, in one round trip. The ids travel as one
# JSON text: asyncpg encodes a text[] parameter element by element, at several times the cost. With no ids
# ('[]'), only the tombstones are looked up.
_CHECK = """
SELECT event_id AS id, NULL::timestamptz AS forgotten_at FROM samples
WHERE event_id = ANY (ARRAY(SELECT json_array_elements_text($1::json)))
UNION ALL
SELECT user_id, forgotten_at FROM forgotten_users
WHERE user_id = ANY (ARRAY(SELECT json_array_elements_text($2::json)))
"""
_NULL = "\\N"
"""NULL in COPY's text format."""
_json = msgspec.json.encode
_decode_offsets = msgspec.json.Decoder(dict[str, int]).decode
_sample_of, _partition_of, _offset_of = itemgetter(0), itemgetter(1), itemgetter(2)
_event_id, _model, _user, _weight = (attrgetter(name) for name in ("event_id", "model", "user_id", "weight"))


def _text(value: str) -> str:
    """A value in COPY's text format: backslash, tab, newline and carriage return escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def _optional(value: str | None) -> str:
    return _NULL if value is None else _text(value)


def _time_text(when: datetime) -> str:
    """An instant as PostgreSQL reads it: msgspec's RFC 3339 (in C, a fifth of ``isoformat``'s cost) unless the
    offset has seconds, which RFC 3339 cannot write. A naive time is the local time, as asyncpg reads it."""
    zone = when.tzinfo
    if zone is None:
        when, zone = when.astimezone(UTC), UTC
    offset = zone.utcoffset(None)  # a fixed offset (pydantic's, timezone's); None: one that varies
    if offset is None or offset.seconds % 60 or offset.microseconds:
        return when.isoformat()
    return _json(when)[1:-1].decode()


def copy_line(row: SampleAt) -> str:
    """A sample in PostgreSQL's COPY text format, all columns after ``window_id`` (pure CPU work, so a
    consumer can prepare the next batch's lines while the previous batch is being written)."""
    sample, partition, offset = row
    user, session, adapter, when = sample.user_id, sample.session_id, sample.adapter_version, sample.event_time
    texts = f"{sample.event_id}{sample.model}{sample.kind}{sample.prompt}{sample.completion}{user}{session}{adapter}"
    if "\\" in texts or "\t" in texts or "\n" in texts or "\r" in texts:  # rare: escape field by field
        event_id, model, kind = _text(sample.event_id), _text(sample.model), _text(sample.kind)
        prompt, completion = _text(sample.prompt), _text(sample.completion)  # the prompt: JSON text, for jsonb
        user, session, adapter = _optional(user), _optional(session), _optional(adapter)
    else:
        event_id, model, kind, prompt, completion = (
            sample.event_id, sample.model, sample.kind, sample.prompt, sample.completion
        )  # fmt: skip
        user = _NULL if user is None else user
        session = _NULL if session is None else session
        adapter = _NULL if adapter is None else adapter
    when_text = _NULL if when is None else _time_text(when)
    where = f"{_NULL if partition is None else partition}\t{_NULL if offset is None else offset}"
    return (
        f"{event_id}\t{model}\t{kind}\t{prompt}\t{completion}\t{sample.weight!r}\t{sample.label}\t{user}\t"
        f"{session}\t{adapter}\t{when_text}\t{where}\t{'t' if sample.holdout else 'f'}"
    )


class ConcurrentInsert(StreamEngineError):
    """A sample of the batch was stored by another transaction meanwhile (another model line's writer, as
    writers of one model line take turns on its window): the batch is retried."""


async def _lock_open_window(conn: asyncpg.Connection, model: str) -> asyncpg.Record:
    return (await _lock_open_windows(conn, [model]))[model]


_LOCK_OPEN = (
    "SELECT id, model, samples, weight, first_offsets::text AS held_first, last_offsets::text AS held_last"
    " FROM windows WHERE model = ANY ($1::text[]) AND state = 'open' ORDER BY model FOR UPDATE"
)


async def _lock_open_windows(conn: asyncpg.Connection, models: list[str]) -> dict[str, asyncpg.Record]:
    """Lock the open window of each model line (sorted: one lock order for every replica), opening the missing
    ones (first sample of a line, or its last window just closed): a few statements whatever the lines' number."""
    rows = {r["model"]: r for r in await conn.fetch(_LOCK_OPEN, models)}
    if missing := [model for model in models if model not in rows]:
        await conn.execute("INSERT INTO model_lines (model) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", missing)
        await conn.execute(
            "INSERT INTO windows (model) SELECT unnest($1::text[]) ON CONFLICT (model) WHERE state = 'open' DO NOTHING",
            missing,
        )
        rows.update((r["model"], r) for r in await conn.fetch(_LOCK_OPEN, missing))
    return rows


async def _add_job(conn: asyncpg.Connection, window: asyncpg.Record, reason: str) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, $3) RETURNING id",
        window["model"],
        window["id"],
        reason,
    )
    return job_id


async def _close(conn: asyncpg.Connection, window: asyncpg.Record, reason: str) -> ClosedWindow:
    await conn.execute(
        "UPDATE windows SET state = 'closed', closed_at = now(), close_reason = $2 WHERE id = $1",
        window["id"],
        reason,
    )
    job_id = await _add_job(conn, window, reason)
    return ClosedWindow(window["model"], window["id"], job_id, reason, window["samples"], window["weight"])


@dataclass(slots=True)
class _Rows:
    """Rows of a batch in batch order, with their COPY lines, when their records entered Kafka and their
    events' outcomes (for the canary judgement)."""

    rows: list[SampleAt]
    lines: list[str]
    produced_ms: Sequence[int | None]
    outcomes: Sequence[Outcome | None]

    def take(self, indexes: list[int]) -> _Rows:
        return _Rows([self.rows[i] for i in indexes], [self.lines[i] for i in indexes],
                     [self.produced_ms[i] for i in indexes], [self.outcomes[i] for i in indexes])  # fmt: skip


def _made_before(sample: Sample, produced_ms: int | None, moment: datetime) -> bool:
    """The event is older than ``moment`` by its own time or by the time its record entered Kafka (whichever
    is earlier: an old event sent again is still old). Neither known: it is being written now, so it is not."""
    times = []
    if sample.event_time is not None:
        when = sample.event_time
        times.append(when if when.tzinfo is not None else when.astimezone(UTC))
    if produced_ms is not None and produced_ms >= 0:
        times.append(datetime.fromtimestamp(produced_ms / 1000, UTC))
    return bool(times) and min(times) < moment


async def write_batch(
    db: Database,
    rows: list[SampleAt],
    policy: WindowPolicy | Callable[[str], WindowPolicy],
    lines: list[str] | None = None,
    produced_ms: Sequence[int | None] | None = None,
    look_first: bool = True,
    outcomes: Sequence[Outcome | None] | None = None,
) -> BatchOutcome:
    """Store samples (duplicates by event_id and samples of forgotten users are dropped) and close windows that
    reach the policy (``policy``: one for every line, or the policy of each model line).

    One transaction and a handful of statements, whatever the batch size and the number of model lines in it;
    a line whose window the batch closes adds a few of its own. The first copy
    of an event id in the batch wins. Samples already stored and tombstones are found first (under the
    window's lock), so every new sample is written once, with COPY, straight into the window it belongs to.
    ``lines``: the rows' :func:`copy_line`, when the caller prepared them; ``produced_ms``: when each row's
    record entered Kafka (ms since the epoch; the record's timestamp), for the tombstones. ``look_first=False``
    skips looking for stored samples (PostgreSQL's lookup of 1000 ids costs about as much as their COPY): when
    one is stored, the COPY's unique index refuses it and the batch is written again, looking first.
    ``outcomes``: each event's outcome (``core.rollout.outcome``); the new events naming a version are counted
    for the canary judgement in the same transaction (``rollouts.count_outcomes``).
    """
    none = [None] * len(rows)
    lines = lines if lines is not None else [copy_line(r) for r in rows]
    batch = _Rows(rows, lines, produced_ms or none, outcomes or none)
    ids = list(map(_event_id, map(_sample_of, rows)))
    copies = 0
    if len(set(ids)) < len(ids):  # rare: keep the first copy of each id
        first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))
        copies = len(ids) - len(first)
        batch = batch.take(sorted(first.values()))
    policy_of = policy if callable(policy) else lambda _: policy
    if not look_first:
        try:
            return await _write(db, batch, policy_of, BatchOutcome(duplicates=copies), look_first=False)
        except ConcurrentInsert:
            pass  # some were stored before: again, looking first
    return await _write(db, batch, policy_of, BatchOutcome(duplicates=copies), look_first=True)


async def _write(
    db: Database, batch: _Rows, policy: Callable[[str], WindowPolicy], outcome: BatchOutcome, look_first: bool
) -> BatchOutcome:
    async with db.pool.acquire() as conn, conn.transaction():
        opened = await _lock_open_windows(conn, sorted(set(map(_model, map(_sample_of, batch.rows)))))
        fresh = await _unstored(conn, batch, outcome, look_first)
        samples = list(map(_sample_of, fresh.rows))
        await rollouts.count_outcomes(conn, samples, fresh.outcomes)
        models = list(map(_model, samples))
        if len(set(models)) == 1:  # the common case: one line, its rows as they are
            window = opened[models[0]]
            await _store(conn, window, fresh, _plan(window, fresh, policy(models[0])), outcome)
        elif models:
            await _store_lines(conn, opened, fresh, samples, models, policy, outcome)
    return outcome


async def _unstored(conn: asyncpg.Connection, batch: _Rows, outcome: BatchOutcome, look_first: bool) -> _Rows:
    """The rows that are neither stored already (unless not ``look_first``) nor of a user forgotten since their
    event: one lookup for the whole batch."""
    samples = list(map(_sample_of, batch.rows))
    users = set(map(_user, samples))
    users.discard(None)
    ids = _json(list(map(_event_id, samples))).decode() if look_first else "[]"
    found = await conn.fetch(_CHECK, ids, _json(list(users)).decode())
    if not found:
        return batch
    stored = {r["id"] for r in found if r["forgotten_at"] is None}
    forgotten = {r["id"]: r["forgotten_at"] for r in found if r["forgotten_at"] is not None}
    keep = []
    for index, sample in enumerate(samples):
        if sample.event_id in stored:
            outcome.duplicates += 1
        elif sample.user_id in forgotten and _made_before(sample, batch.produced_ms[index], forgotten[sample.user_id]):
            outcome.forgotten += 1
        else:
            keep.append(index)
    return batch.take(keep)


async def _insert(conn: asyncpg.Connection, segments: Sequence[tuple[int, list[str]]]) -> None:
    """COPY the lines of each (window id, lines) segment into that window."""
    parts = []
    for window_id, lines in segments:
        prefix = f"{window_id}\t"
        framed = lines.copy()  # the first line's prefix and the last newline on the ends: one string, not three
        framed[0], framed[-1] = prefix + framed[0], framed[-1] + "\n"
        if len(framed) == 1:
            framed[0] = prefix + lines[0] + "\n"
        parts.append(f"\n{prefix}".join(framed))
    await _copy(conn, parts[0] if len(parts) == 1 else "".join(parts), sum(len(lines) for _, lines in segments))


async def _copy(conn: asyncpg.Connection, text: str, count: int) -> None:
    """COPY ``count`` samples (``COPY_COLUMNS`` lines, in PostgreSQL's text format) into their windows."""
    data = text.encode()
    try:
        # A memoryview: asyncpg would take bytes for a file name.
        status = await conn.copy_to_table("samples", source=memoryview(data), columns=COPY_COLUMNS, format="text")
    except asyncpg.UniqueViolationError:
        raise ConcurrentInsert(f"a sample of the batch of {count} was stored concurrently") from None
    copied = int(status.rsplit(" ", 1)[-1])  # "COPY <rows>"
    if copied != count:
        raise StreamEngineError(f"COPY stored {copied} of {count} samples")


# One segment of a batch into its window: the counters and offsets, and the window closed when the segment
# reaches the threshold ($7), in one statement.
_ACCOUNT = """
UPDATE windows SET samples = samples + $2, weight = weight + $3, stored = stored + $4,
    first_offsets = first_offsets || $5::text::jsonb, last_offsets = last_offsets || $6::text::jsonb,
    state = CASE WHEN $7 THEN 'closed' ELSE state END,
    closed_at = CASE WHEN $7 THEN now() ELSE closed_at END,
    close_reason = CASE WHEN $7 THEN 'threshold' ELSE close_reason END
WHERE id = $1 RETURNING *
"""
# The closed window's job and the model line's next window, in one statement (under the closed window's lock,
# no other writer can open one meanwhile).
_JOB_AND_NEXT = """
WITH job AS (INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'threshold') RETURNING id)
INSERT INTO windows (model) VALUES ($1) RETURNING *, (SELECT id FROM job) AS job_id
"""


@dataclass(slots=True)
class _Plan:
    """Which new samples of one line are trainable, their weights, and where they close windows (``cut_points``)."""

    trainable: list[bool]
    weights: list[float]
    cuts: list[int]


def _plan(window: asyncpg.Record, fresh: _Rows, policy: WindowPolicy) -> _Plan:
    samples = list(map(_sample_of, fresh.rows))
    trainable = [s.label > 0 and s.weight > 0 for s in samples]  # Sample.trainable, without a call per sample
    weights = list(map(_weight, samples))
    cuts = cut_points(window["samples"], window["weight"], list(zip(trainable, weights, strict=True)), policy)
    return _Plan(trainable, weights, cuts)


Changes = dict[str, dict[str, int]]
"""Offsets by line, then by partition (as text, as jsonb keys them)."""


def _offset_changes(
    held: dict[str, tuple[str, str]], models: list[str], rows: list[SampleAt]
) -> tuple[Changes, Changes]:
    """The offsets of ``rows`` (of lines ``models``) that change what each line's window holds (``held``: its first
    and last offsets as JSON text): a first offset earlier than the window's, a last one later, any of a new partition
    (rows without a partition or an offset skipped). Merged with ``||``, they give the least first and the greatest
    last offset of each partition (computed here: in SQL, per window, it cost several times more)."""
    keys = list(zip(models, map(_partition_of, rows), strict=True))
    offsets = list(map(_offset_of, rows))
    first = dict(zip(reversed(keys), reversed(offsets), strict=True))
    last = dict(zip(keys, offsets, strict=True))
    decoded: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    earlier: Changes = {}
    later: Changes = {}
    for seen, changes, kind in ((first, earlier, 0), (last, later, 1)):
        for (model, partition), offset in seen.items():
            if partition is None or offset is None:
                continue
            window = decoded.get(model)
            if window is None:
                first_text, last_text = held[model]
                window = decoded[model] = (_decode_offsets(first_text), _decode_offsets(last_text))
            key = str(partition)
            known = window[kind].get(key)
            if known is None or (offset < known if kind == 0 else offset > known):
                changes.setdefault(model, {})[key] = offset
    return earlier, later


def _held(window: asyncpg.Record) -> tuple[str, str]:
    """The offsets a locked window holds (``_LOCK_OPEN``), as JSON text."""
    return window["held_first"], window["held_last"]


_NOTHING_HELD = ("{}", "{}")
"""The offsets of a window just opened."""


def _count(outcome: BatchOutcome, model: str, inserted: int) -> None:
    outcome.inserted += inserted
    outcome.inserted_by_model[model] = outcome.inserted_by_model.get(model, 0) + inserted


async def _store(
    conn: asyncpg.Connection, window: asyncpg.Record, fresh: _Rows, plan: _Plan, outcome: BatchOutcome
) -> None:
    """Insert new samples into the open window, closing it (and opening the next) exactly at the threshold."""
    trainable, weights, cuts = plan.trainable, plan.weights, plan.cuts
    held = _held(window)
    for start, end in itertools.pairwise([0, *cuts, len(fresh.rows)]):
        if start == end:  # the last cut is the batch's end: the next window opens with the next sample
            break
        await _insert(conn, [(window["id"], fresh.lines[start:end])])
        flags, closes = trainable[start:end], end in cuts
        segment = fresh.rows[start:end]
        model = window["model"]
        first, last = _offset_changes({model: held}, [model] * len(segment), segment)
        window = await conn.fetchrow(
            _ACCOUNT,
            window["id"],
            sum(flags),
            sum(itertools.compress(weights[start:end], flags)),
            end - start,
            _json(first.get(model, {})).decode(),
            _json(last.get(model, {})).decode(),
            closes,
        )
        _count(outcome, window["model"], end - start)
        if not closes:
            continue
        if end < len(fresh.rows):  # more samples follow
            following = await conn.fetchrow(_JOB_AND_NEXT, window["model"], window["id"])
            job_id = following["job_id"]
        else:
            following, job_id = window, await _add_job(conn, window, "threshold")
        outcome.closed.append(
            ClosedWindow(window["model"], window["id"], job_id, "threshold", window["samples"], window["weight"])
        )
        window, held = following, _NOTHING_HELD
    outcome.open_samples[window["model"]] = window["samples"]


# The lines of a batch whose windows stay open: every window's counters and offsets in one statement. The offsets
# that change (``_offset_changes``) travel as one JSON object per kind ({line: {partition: offset}}), parsed once (a
# materialized CTE: inlined, a generic plan would parse them again for every window).
_ACCOUNT_LINES = """
WITH o AS MATERIALIZED (SELECT $5::text::jsonb AS first, $6::text::jsonb AS last)
UPDATE windows AS w SET samples = w.samples + u.samples, weight = w.weight + u.weight, stored = w.stored + u.stored,
    first_offsets = w.first_offsets || coalesce(o.first -> w.model, '{}'),
    last_offsets = w.last_offsets || coalesce(o.last -> w.model, '{}')
FROM unnest($1::bigint[], $2::integer[], $3::float8[], $4::integer[]) AS u (id, samples, weight, stored), o
WHERE w.id = u.id
"""


def _totals(samples: list[Sample]) -> dict[str, tuple[int, float]]:
    """Trainable samples and their summed weight (in batch order, as ``_plan`` sums them), by line."""
    counts: dict[str, int] = {}
    weights: dict[str, float] = {}
    for sample in samples:
        if sample.label > 0 and sample.weight > 0:  # Sample.trainable, without a call per sample
            model = sample.model
            counts[model] = counts.get(model, 0) + 1
            weights[model] = weights.get(model, 0) + sample.weight
    return {model: (count, weights[model]) for model, count in counts.items()}


def _may_close(window: asyncpg.Record, trainable: int, weight: float, policy: WindowPolicy) -> bool:
    """The line's new samples may reach its threshold: only then are its cut points needed. Counts and weights only
    grow, so when the totals stay below the threshold no sample closes the window (a float margin on the weight)."""
    total = window["weight"] + weight
    return (
        trainable > 0
        and policy.close_reason(window["samples"] + trainable, total + 1e-9 * (1 + abs(total))) is not None
    )


async def _store_lines(
    conn: asyncpg.Connection,
    opened: dict[str, asyncpg.Record],
    fresh: _Rows,
    samples: list[Sample],
    models: list[str],
    policy: Callable[[str], WindowPolicy],
    outcome: BatchOutcome,
) -> None:
    """Insert the new samples of several lines: those of lines whose windows the batch may close line by line
    (:func:`_store`), the others with one COPY and one update whatever their number."""
    totals = _totals(samples)
    closing = sorted(m for m, (n, weight) in totals.items() if _may_close(opened[m], n, weight, policy(m)))
    if closing:
        indexes: dict[str, list[int]] = {model: [] for model in closing}
        staying: list[int] = []
        for index, model in enumerate(models):
            indexes.get(model, staying).append(index)
        for model in closing:
            group = fresh.take(indexes[model])
            await _store(conn, opened[model], group, _plan(opened[model], group, policy(model)), outcome)
        fresh = fresh.take(staying)
        models = [models[i] for i in staying]
    if not models:
        return
    ids = {model: opened[model]["id"] for model in set(models)}
    await _copy(
        conn, "".join([f"{ids[m]}\t{line}\n" for m, line in zip(models, fresh.lines, strict=True)]), len(models)
    )
    stored = Counter(models)
    counts, weights = [], []
    for model in ids:
        count, weight = totals.get(model, (0, 0.0))
        counts.append(count)
        weights.append(weight)
        outcome.open_samples[model] = opened[model]["samples"] + count  # under the window's lock: what it holds now
    first, last = _offset_changes({model: _held(opened[model]) for model in ids}, models, fresh.rows)
    await conn.execute(
        _ACCOUNT_LINES,
        list(ids.values()),
        counts,
        weights,
        [stored[m] for m in ids],
        _json(first).decode(),
        _json(last).decode(),
    )
    outcome.inserted += len(models)
    for model, count in stored.items():
        outcome.inserted_by_model[model] = outcome.inserted_by_model.get(model, 0) + count


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


async def last_ticks(db: Database) -> dict[str, datetime]:
    """When the cron tick of every model line last fired."""
    return {r["model"]: r["last_tick_at"] for r in await db.fetch("SELECT model, last_tick_at FROM model_lines")}


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
