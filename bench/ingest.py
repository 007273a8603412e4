"""Ingest benchmark: 1 KB feedback events through the real ingest path into PostgreSQL.

Four ways of moving the same pre-produced records, measured in one run (ratios are what count; the
absolute numbers depend on the machine and on whatever else runs on it):

(a) ``kafka``   a raw aiokafka consumer reading the records (the broker limit);
(b) ``copy``    asyncpg ``COPY`` (binary, one transaction per batch) of the same rows, already decoded,
                into a table defined like ``samples`` (columns, indexes, foreign key to ``windows``):
                the database limit;
(c) ``ingest``  streamengine's ingest: the consumer of ``streamengine.stream.app.build_app`` feeding
                :class:`~streamengine.stream.ingest.IngestPipeline`, as ``streamengine run`` wires them,
                consuming the pre-filled topic until every sample is committed (decode, validate, DLQ
                check, dedup, window accounting and closing: the whole path);
(d) ``naive``   what a user would write by hand: a faust agent, ``async for value in stream``,
                ``json.loads`` and one ``INSERT`` (autocommit) per event into a table like ``samples``.

And ``plain``: (c) with ``privacy.redact`` off (no redaction), on a database of its own, so that
``ingest / plain`` (rate and CPU per event) is what redaction costs in the same run.

Targets (medians over the repeats): (c) >= 0.6 * min(a, b), the ingest process's CPU per event in (c)
<= 15 us, and (c) >= 5 * (d).

Rates are steady-state: from the end of the first batch (the first event for (d)) to the last record
read or stored, over the records after the first batch. CPU is measured over the same interval:
this process (``time.process_time``: every thread), PostgreSQL's client backends serving the
benchmark's database and the tansu broker (``psutil`` on their pids; PostgreSQL's shared WAL
writer, checkpointer and autovacuum are not counted).

Run: ``python -m bench.ingest --events 50000 --repeat 3`` (starts its own tansu broker and a fresh
database on the PostgreSQL server at 127.0.0.1:5432, or an embedded one; stops/drops all of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamengine.config.settings import Settings, load_settings
from streamengine.contract.events import decode_feedback
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.local.embedded import Postgres, Tansu, create_database, drop_database
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.stream.app import build_app
from streamengine.stream.ingest import Classified, IngestPipeline, Record
from streamengine.stream.producer import start_producer
from streamengine.stream.topics import ensure_topics

try:
    import psutil
except ImportError:  # pragma: no cover - psutil ships with the dev environment
    psutil = None

MODEL = "bench-llama"
LIMIT_TARGET = 0.6
"""(c) / min(a, b): the median of the per-repeat ratios must reach this."""
CPU_TARGET_US = 15.0
"""CPU of the ingest process per event in (c), median of the repeats: at most this."""
NAIVE_TARGET = 5.0
"""(c) / (d)."""
LINES_TARGET = 0.9
"""``--lines``: ingest's rate with the most lines / its rate with one line, median of the per-repeat ratios."""
RECORD_BYTES = 1024
PHASES = ("kafka", "copy", "ingest", "plain", "naive")
LABELS = {
    "kafka": "(a) raw aiokafka consumer",
    "copy": "(b) asyncpg COPY",
    "ingest": "(c) streamengine ingest",
    "plain": "(c) ingest, redaction off",
    "naive": "(d) faust + INSERT per event",
}

# --------------------------------------------------------------------------------------------- events

_TOPICS = [
    "the retry policy of our payment service",
    "a SQL query that groups orders by week",
    "the difference between a mutex and a semaphore",
    "how to rotate TLS certificates without downtime",
    "a polite reply to a customer asking for a refund",
    "the time complexity of merging k sorted lists",
    "why my Kubernetes pod is stuck in CrashLoopBackOff",
    "a summary of the quarterly sales report",
    "unit tests for a date parsing function",
    "the best way to cache expensive API calls",
]
_SENTENCES = [
    "Start by checking the logs of the failing component, since they usually name the first error.",
    "A simple approach is to keep the state in one place and make every other part read from it.",
    "You can measure the effect by running the same workload before and after the change.",
    "Note that the default configuration favours safety over speed, which is usually what you want.",
    "If the input can be very large, stream it instead of loading everything into memory at once.",
    "The second option is cheaper to operate but harder to reason about when something goes wrong.",
    "Here is a short example that shows the idea; adapt the names to match your own code base.",
    "Make sure the operation is idempotent, so that a retry after a timeout does no harm.",
    "In most cases the bottleneck is the network round trip, not the computation itself.",
    "Add a test that reproduces the problem first, then fix it and keep the test as a guard.",
    "Prefer explicit timeouts on every call that leaves the process, and log when they fire.",
    "Batching the writes usually gives an order of magnitude more throughput than single rows.",
]


def _text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < chars:
        sentence = rng.choice(_SENTENCES)
        parts.append(sentence)
        size += len(sentence) + 1
    return " ".join(parts)[:chars].rstrip()


def make_event(i: int, rng: random.Random, size: int = RECORD_BYTES, model: str = MODEL) -> bytes:
    """A valid FeedbackEvent v1, realistic fields, padded with prompt/response text to ``size`` bytes."""
    kind = rng.choices(["thumbs_up", "thumbs_down", "rating", "correction"], weights=[60, 15, 20, 5])[0]
    question = f"Can you explain {rng.choice(_TOPICS)}? {_text(rng, rng.randint(120, 260))}"
    event: dict[str, Any] = {
        "event_id": f"evt-{i:09d}-{rng.getrandbits(48):012x}",
        "model": model,
        "prompt": question,
        "response": "",
        "kind": kind,
        "user_id": f"user-{rng.randint(1, 5000)}",
        "session_id": f"sess-{rng.getrandbits(40):010x}",
        "adapter_version": "v1.3",
        "timestamp": (datetime(2025, 6, 1, tzinfo=UTC) + timedelta(seconds=i)).isoformat(),
    }
    if rng.random() < 0.2:  # a chat transcript instead of a plain prompt
        event["prompt"] = [
            {"role": "system", "content": "You are a helpful engineering assistant."},
            {"role": "user", "content": question},
        ]
    if kind == "rating":
        event["rating"] = rng.randint(1, 5)
    if kind == "correction":
        event["correction"] = _text(rng, 200)
    room = size - len(json.dumps(event).encode())
    event["response"] = _text(rng, max(room, 16))
    return json.dumps(event).encode()


def line_name(i: int) -> str:
    return f"line-{i}"


def make_events(n: int, seed: int = 0, lines: int = 0) -> list[tuple[bytes, bytes]]:
    """``n`` (key, value) pairs; keys are user ids, as serving nodes would send. ``lines``: the events go to that
    many model lines in turn (:func:`line_name`); 0: all to ``MODEL``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value = make_event(i, rng, model=line_name(i % lines) if lines else MODEL)
        out.append((json.loads(value)["user_id"].encode(), value))
    return out


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    try:
        for start in range(0, len(records), 5000):
            futures = [await producer.send(topic, value=v, key=k) for k, v in records[start : start + 5000]]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------------------------- CPU


def _proc_cpu(pid: int) -> float | None:
    if psutil is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user + times.system)


class PgBackends:
    """CPU seconds of the PostgreSQL client backends connected to one database (psutil on their pids)."""

    def __init__(self, admin: asyncpg.Connection, dbname: str) -> None:
        self.admin, self.dbname = admin, dbname
        self.pids: set[int] = set()

    async def refresh(self) -> None:
        rows = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'", self.dbname
        )
        self.pids |= {r["pid"] for r in rows}

    def snap(self) -> dict[int, float]:
        out = {}
        for pid in self.pids:
            cpu = _proc_cpu(pid)
            if cpu is not None:
                out[pid] = cpu
        return out

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float | None:
        if not after and psutil is None:
            return None
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass
class Clock:
    """Wall and CPU readings at the start and end of the measured interval."""

    pg: PgBackends | None
    broker_pid: int | None
    t0: float = 0.0
    cpu0: float = 0.0
    pg0: dict[int, float] = field(default_factory=dict)
    broker0: float | None = None
    t1: float = 0.0
    cpu1: float = 0.0
    pg1: dict[int, float] = field(default_factory=dict)
    broker1: float | None = None

    def start(self) -> None:
        self.pg0 = self.pg.snap() if self.pg else {}
        self.broker0 = _proc_cpu(self.broker_pid) if self.broker_pid else None
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    def stop(self) -> None:
        self.t1, self.cpu1 = time.perf_counter(), time.process_time()
        self.pg1 = self.pg.snap() if self.pg else {}
        self.broker1 = _proc_cpu(self.broker_pid) if self.broker_pid else None

    def result(self, phase: str, events: int, **extra: Any) -> Result:
        wall = self.t1 - self.t0
        pg = PgBackends.delta(self.pg0, self.pg1) if self.pg else None
        broker = self.broker1 - self.broker0 if self.broker0 is not None and self.broker1 is not None else None
        return Result(
            phase=phase,
            events=events,
            seconds=wall,
            events_per_s=events / wall,
            cpu_us_per_event=(self.cpu1 - self.cpu0) / events * 1e6,
            pg_cpu_us_per_event=None if pg is None else pg / events * 1e6,
            broker_cpu_us_per_event=None if broker is None else broker / events * 1e6,
            extra=extra,
        )


@dataclass
class Result:
    phase: str
    events: int
    seconds: float
    events_per_s: float
    cpu_us_per_event: float
    pg_cpu_us_per_event: float | None
    broker_cpu_us_per_event: float | None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- phases

SAMPLE_COLUMNS = [
    "event_id", "model", "window_id", "kind", "prompt", "completion", "weight", "label", "user_id",
    "session_id", "adapter_version", "event_time", "source_partition", "source_offset", "holdout",
]  # fmt: skip


async def _wait(done: asyncio.Event, timeout_s: float, what: str, progress: Callable[[], int]) -> None:
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        raise RuntimeError(f"{what}: not done after {timeout_s:.0f} s ({progress()} events)") from None


async def run_kafka(bootstrap: str, topic: str, n: int, batch: int, broker_pid: int | None) -> Result:
    """(a) A raw aiokafka consumer reading every record (assigned partitions, no group, no commits)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        clock = Clock(None, broker_pid)
        seen = size = 0
        first = 0
        while seen < n:
            got = await consumer.getmany(timeout_ms=1000, max_records=batch)
            for records in got.values():
                for record in records:  # touch every record, as any consumer would
                    size += len(record.value or b"")
                seen += len(records)
            if not first and seen:
                first = seen
                clock.start()
        clock.stop()
        return clock.result("kafka", seen - first, bytes_read=size)
    finally:
        await consumer.stop()


def _copy_rows(records: list[tuple[bytes, bytes]], policy: SamplePolicy, limit: int) -> list[tuple[Any, ...]]:
    rows = []
    for offset, (_, value) in enumerate(records):
        s = to_sample(decode_feedback(value, limit), policy)
        rows.append(
            (s.event_id, s.model, 1, s.kind, s.prompt, s.completion, s.weight, s.label, s.user_id, s.session_id,
             s.adapter_version, s.event_time, offset % 6, offset, s.holdout)
        )  # fmt: skip
    return rows


async def _like_samples(conn: asyncpg.Connection, table: str) -> int:
    """A table defined like ``samples`` (columns, defaults, indexes, the foreign key to ``windows``) and the id
    of a window row of its own that its rows reference."""
    await conn.execute(f"CREATE TABLE {table} (LIKE samples INCLUDING ALL)")
    await conn.execute(f"ALTER TABLE {table} ADD FOREIGN KEY (window_id) REFERENCES windows (id)")
    await conn.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", table)
    window_id: int = await conn.fetchval("INSERT INTO windows (model) VALUES ($1) RETURNING id", table)
    return window_id


async def run_copy(dsn: str, rows: list[tuple[Any, ...]], batch: int, pg: PgBackends) -> Result:
    """(b) COPY the samples' rows, one COPY (one transaction) per batch, into a table like ``samples``."""
    conn = await asyncpg.connect(dsn)  # no jsonb codec: the prompt column gets the JSON text as is
    try:
        window_id = await _like_samples(conn, "copy_samples")
        rows = [(r[0], r[1], window_id, *r[3:]) for r in rows]
        await pg.refresh()
        clock = Clock(pg, None)
        await conn.copy_records_to_table("copy_samples", records=rows[:batch], columns=SAMPLE_COLUMNS)
        clock.start()
        for start in range(batch, len(rows), batch):
            await conn.copy_records_to_table(
                "copy_samples", records=rows[start : start + batch], columns=SAMPLE_COLUMNS
            )
        clock.stop()
        stored = await conn.fetchval("SELECT count(*) FROM copy_samples")
        if stored != len(rows):
            raise RuntimeError(f"copy: {stored} rows stored, expected {len(rows)}")
        return clock.result("copy", len(rows) - batch)
    finally:
        await conn.close()


class _MeasuredPipeline(IngestPipeline):
    """The real pipeline; only counts what it stores, starts/stops the clock and times its pure CPU step."""

    def __init__(self, settings: Settings, db: Database, sender: Any, n: int, clock: Clock) -> None:
        super().__init__(settings, db, sender)
        self.n, self.clock = n, clock
        self.batches = self.seen = self.stored = self.first = 0
        self.classify_cpu = 0.0
        """CPU seconds in ``classify`` while the clock runs (decode, validate, redact, event -> sample, COPY line)."""
        self.done = asyncio.Event()

    def classify(self, records: Sequence[Record]) -> Classified:
        started = time.process_time()
        batch = super().classify(records)
        if self.clock.t0 and not self.clock.t1:
            self.classify_cpu += time.process_time() - started
        return batch

    async def store(self, batch: Classified) -> windows.BatchOutcome:
        outcome = await super().store(batch)
        self.batches += 1
        self.seen += len(batch)
        self.stored += outcome.inserted
        if self.batches == 1:
            self.first = len(batch)
            self.clock.start()
        if self.stored >= self.n and not self.done.is_set():
            self.clock.stop()
            self.done.set()
        return outcome


async def run_ingest(settings: Settings, dbname: str, n: int, pg: PgBackends, broker_pid: int | None) -> Result:
    """(c) streamengine's ingest: ``build_app`` + IngestPipeline, as ``streamengine run`` wires them."""
    db = await Database.connect(settings.database)
    producer = await start_producer(settings.kafka)
    await pg.refresh()
    clock = Clock(pg, broker_pid)
    pipeline = _MeasuredPipeline(settings, db, producer, n, clock)
    app = build_app(settings, pipeline, Path(tempfile.mkdtemp()))
    try:
        await app.start()
        await _wait(pipeline.done, 600, "ingest", lambda: pipeline.stored)
        await pg.refresh()  # a connection the pool opened during the run (counted from zero)
        clock.pg1 = pg.snap() | clock.pg1
        stored = await db.fetchval("SELECT count(*) FROM samples")
        closed = await db.fetchval("SELECT count(*) FROM windows WHERE state = 'closed'")
        accounted = await db.fetchval("SELECT sum(stored) FROM windows")
        if stored != n or accounted != n:
            raise RuntimeError(f"ingest: {stored} samples stored, {accounted} accounted, expected {n}")
    finally:
        await app.stop()
        await producer.stop()
        await db.close()
    return clock.result(
        "ingest", n - pipeline.first, batches=pipeline.batches, windows_closed=closed,
        mean_batch=round(pipeline.seen / pipeline.batches, 1),
        classify_cpu_us_per_event=pipeline.classify_cpu / (n - pipeline.first) * 1e6,
    )  # fmt: skip


_NAIVE_INSERT = """
INSERT INTO naive_samples (event_id, model, window_id, kind, prompt, completion, weight, label, user_id,
                           session_id, adapter_version, event_time, source_partition, source_offset)
VALUES ($1, $2, $14, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (event_id) DO NOTHING
"""


async def run_naive(settings: Settings, dsn: str, n: int, pg: PgBackends, broker_pid: int | None) -> Result:
    """(d) A hand-written faust agent: one INSERT (own transaction) per event, faust's automatic acks."""
    kafka = settings.kafka
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        window_id = await _like_samples(conn, "naive_samples")
    await pg.refresh()
    clock = Clock(pg, broker_pid)
    done = asyncio.Event()
    count = [0]
    datadir = Path(tempfile.mkdtemp(prefix="bench-faust-"))
    app = faust.App(
        f"{kafka.group_id}-naive",
        broker=f"kafka://{kafka.bootstrap_servers}",
        value_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=kafka.session_timeout_s,
        broker_rebalance_timeout=kafka.rebalance_timeout_s,
    )
    topic = app.topic(kafka.feedback_topic, value_type=bytes, value_serializer="raw")

    @app.agent(topic)
    async def ingest(stream: Any) -> None:
        async for value in stream:
            event = json.loads(value)
            kind = event["kind"]
            label = 1 if kind in ("thumbs_up", "correction") or event.get("rating", 0) >= 4 else -1
            await pool.execute(
                _NAIVE_INSERT,
                event["event_id"],
                event["model"],
                kind,
                json.dumps(event["prompt"]),
                event.get("correction") or event["response"],
                float(event.get("weight") or 1.0),
                label,
                event.get("user_id"),
                event.get("session_id"),
                event.get("adapter_version"),
                datetime.fromisoformat(event["timestamp"]) if event.get("timestamp") else None,
                stream.current_event.message.partition,
                stream.current_event.message.offset,
                window_id,
            )
            count[0] += 1
            if count[0] == 1:
                clock.start()
            elif count[0] == n:
                clock.stop()
                done.set()

    try:
        await app.start()
        await _wait(done, 900, "naive", lambda: count[0])
        await pg.refresh()
        clock.pg1 = pg.snap() | clock.pg1
    finally:
        await app.stop()
        await pool.close()
        shutil.rmtree(datadir, ignore_errors=True)
    return clock.result("naive", n - 1)


# --------------------------------------------------------------------------------------------- driver


def bench_settings(
    cfg: Config, bootstrap: str, suffix: str, dsn: str, group: str, redact: bool = True, **lines: Any
) -> Settings:
    """Settings as ``streamengine run`` would get them, on the benchmark's broker and database (``lines``: the
    ``model``/``models`` settings instead of the one line ``MODEL``)."""
    privacy: dict[str, Any] = {} if redact else {"privacy": {"redact": []}}
    return load_settings(
        **privacy,
        kafka={
            "bootstrap_servers": bootstrap,
            "feedback_topic": f"bench.feedback.{suffix}",
            "dlq_topic": f"bench.feedback.dlq.{suffix}",
            "released_topic": f"bench.adapter.released.{suffix}",
            "group_id": f"bench-ingest-{suffix}-{group}",
            "partitions": cfg.partitions,
            "batch_max_records": cfg.batch_max_records,
            "batch_max_wait_s": cfg.batch_max_wait_s,
            "session_timeout_s": 6.0,
            "rebalance_timeout_s": 6.0,
        },
        database={"url": dsn},
        window={"max_samples": cfg.window_max_samples},
        **(lines or {"model": {"name": MODEL}}),
    )


@dataclass
class Config:
    events: int
    naive_events: int
    repeat: int
    batch_max_records: int
    batch_max_wait_s: float
    window_max_samples: int
    partitions: int
    json_path: Path
    phases: tuple[str, ...]
    lines: tuple[int, ...] = ()
    """Numbers of model lines to compare (``--lines``); empty: the phases."""


async def _one_repeat(
    cfg: Config, base: Settings, suffix: str, admin_dsn: str, rows: list[tuple[Any, ...]], broker_pid: int | None,
    number: int,
) -> list[Result]:  # fmt: skip
    k = base.kafka
    name = f"se_bench_{uuid.uuid4().hex[:10]}"
    dsn = create_database(admin_dsn, name)
    results: list[Result] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        settings = bench_settings(cfg, k.bootstrap_servers, suffix, dsn, str(number))
        await (await Database.connect(settings.database)).close()  # migrate: samples exists for LIKE
        pg = PgBackends(admin, name)
        phases = list(cfg.phases)
        if number % 2 == 0 and "ingest" in phases and "plain" in phases:  # alternate which of the two runs first
            i, j = phases.index("ingest"), phases.index("plain")
            phases[i], phases[j] = phases[j], phases[i]
        for phase in phases:
            if phase == "kafka":
                result = await run_kafka(k.bootstrap_servers, k.feedback_topic, cfg.events, cfg.batch_max_records,
                                         broker_pid)  # fmt: skip
            elif phase == "copy":
                result = await run_copy(dsn, rows, cfg.batch_max_records, pg)
            elif phase == "ingest":
                result = await run_ingest(settings, name, cfg.events, pg, broker_pid)
            elif phase == "plain":
                result = await run_plain(cfg, k.bootstrap_servers, suffix, admin, admin_dsn, number, broker_pid)
            else:
                result = await run_naive(settings, dsn, cfg.naive_events, pg, broker_pid)
            pg.pids.clear()
            print(f"  repeat {number}: {LABELS[phase]:<32} {result.events_per_s:>10,.0f} events/s", flush=True)
            results.append(result)
    finally:
        await admin.close()
        drop_database(admin_dsn, name)
    return results


async def run_plain(
    cfg: Config, bootstrap: str, suffix: str, admin: asyncpg.Connection, admin_dsn: str, number: int,
    broker_pid: int | None,
) -> Result:  # fmt: skip
    """(c) with ``privacy.redact`` off: the same records again, own consumer group and database."""
    name = f"se_bench_{uuid.uuid4().hex[:10]}"
    dsn = create_database(admin_dsn, name)
    try:
        settings = bench_settings(cfg, bootstrap, suffix, dsn, f"{number}-plain", redact=False)
        result = await run_ingest(settings, name, cfg.events, PgBackends(admin, name), broker_pid)
    finally:
        drop_database(admin_dsn, name)
    result.phase = "plain"
    return result


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def summarise(cfg: Config, runs: list[list[Result]]) -> dict[str, Any]:
    by_phase: dict[str, list[Result]] = {p: [] for p in cfg.phases}
    for run in runs:
        for result in run:
            by_phase[result.phase].append(result)
    rows: dict[str, dict[str, Any]] = {}
    for phase, results in by_phase.items():
        rows[phase] = {
            "label": LABELS[phase],
            "events_per_s": _median(r.events_per_s for r in results),
            "cpu_us_per_event": _median(r.cpu_us_per_event for r in results),
            "pg_cpu_us_per_event": _median(r.pg_cpu_us_per_event for r in results),
            "broker_cpu_us_per_event": _median(r.broker_cpu_us_per_event for r in results),
            "runs": [asdict(r) for r in results],
        }
    # Ratios per repeat (same-run comparisons), then their median.
    ratios: dict[str, list[float]] = {"ingest_vs_kafka": [], "ingest_vs_copy": [], "ingest_vs_limit": [],
                                      "ingest_vs_naive": [], "ingest_vs_plain": [],
                                      "ingest_cpu_vs_plain": []}  # fmt: skip
    for run in runs:
        rate = {r.phase: r.events_per_s for r in run}
        if "ingest" not in rate:
            continue
        limits = [rate[p] for p in ("kafka", "copy") if p in rate]
        for name, other in (("kafka", rate.get("kafka")), ("copy", rate.get("copy")), ("naive", rate.get("naive"))):
            if other:
                ratios[f"ingest_vs_{name}"].append(rate["ingest"] / other)
        if limits:
            ratios["ingest_vs_limit"].append(rate["ingest"] / min(limits))
        if rate.get("plain"):
            cpu = {r.phase: r.cpu_us_per_event for r in run}
            ratios["ingest_vs_plain"].append(rate["ingest"] / rate["plain"])
            ratios["ingest_cpu_vs_plain"].append(cpu["ingest"] / cpu["plain"])
    medians = {name: _median(values) for name, values in ratios.items()}
    ingest_cpu = rows["ingest"]["cpu_us_per_event"] if "ingest" in rows else None
    targets = {
        f"ingest_vs_limit >= {LIMIT_TARGET:g}": _at_least(medians["ingest_vs_limit"], LIMIT_TARGET),
        f"ingest_cpu_us_per_event <= {CPU_TARGET_US:g}": None if ingest_cpu is None else ingest_cpu <= CPU_TARGET_US,
        f"ingest_vs_naive >= {NAIVE_TARGET:g}": _at_least(medians["ingest_vs_naive"], NAIVE_TARGET),
    }
    return {
        "benchmark": "ingest",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "broker, PostgreSQL and the benchmark share the machine's CPUs",
        },
        "config": {
            "events": cfg.events,
            "naive_events": cfg.naive_events,
            "record_bytes": RECORD_BYTES,
            "repeat": cfg.repeat,
            "partitions": cfg.partitions,
            "kafka.batch_max_records": cfg.batch_max_records,
            "kafka.batch_max_wait_s": cfg.batch_max_wait_s,
            "window.max_samples": cfg.window_max_samples,
        },
        "phases": rows,
        "ratios": {name: {"median": medians[name], "runs": values} for name, values in ratios.items()},
        "targets": targets,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    phases = summary["phases"]
    ingest = phases.get("ingest", {}).get("events_per_s")
    head = f"{'path':<32} {'events/s':>10} {'CPU us/ev':>10} {'PG us/ev':>9} {'broker us/ev':>12} {'(c)/this':>9}"
    lines = [head, "-" * len(head)]
    for row in phases.values():
        ratio = ingest / row["events_per_s"] if ingest and row["events_per_s"] else None
        lines.append(
            f"{row['label']:<32} {_fmt(row['events_per_s'], ',.0f'):>10} {_fmt(row['cpu_us_per_event'], '.1f'):>10}"
            f" {_fmt(row['pg_cpu_us_per_event'], '.1f'):>9} {_fmt(row['broker_cpu_us_per_event'], '.1f'):>12}"
            f" {_fmt(ratio, '.2f'):>9}"
        )
    ratios = summary["ratios"]
    lines.append("")
    for name, target in (("ingest_vs_limit", LIMIT_TARGET), ("ingest_vs_naive", NAIVE_TARGET)):
        median, runs = ratios[name]["median"], ratios[name]["runs"]
        if median is None:
            continue
        verdict = "met" if median >= target else "MISSED"
        each = ", ".join(f"{r:.2f}" for r in runs)
        lines.append(
            f"{name.replace('_vs_', ' / ')}: {median:.2f} (target >= {target:g}: {verdict}; per repeat {each})"
        )
    if "ingest" in phases:
        cpu, runs = phases["ingest"]["cpu_us_per_event"], phases["ingest"]["runs"]
        verdict = "met" if cpu <= CPU_TARGET_US else "MISSED"
        each = ", ".join(f"{r['cpu_us_per_event']:.1f}" for r in runs)
        lines.append(f"ingest CPU us/event: {cpu:.1f} (target <= {CPU_TARGET_US:g}: {verdict}; per repeat {each})")
        classify = [r["extra"]["classify_cpu_us_per_event"] for r in runs]
        each = ", ".join(f"{r:.1f}" for r in classify)
        lines.append(f"  of which classify (decode ... COPY line): {_median(classify):.1f} (per repeat {each})")
    for name, what in (("ingest_vs_plain", "rate"), ("ingest_cpu_vs_plain", "CPU us per event")):
        median, runs = ratios[name]["median"], ratios[name]["runs"]
        if median is not None:
            each = ", ".join(f"{r:.3f}" for r in runs)
            lines.append(f"redaction on / off, {what}: {median:.3f} (per repeat {each})")
    return "\n".join(lines)


async def amain(cfg: Config, tansu: Tansu, admin_dsn: str) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    base = bench_settings(cfg, tansu.bootstrap, suffix, admin_dsn, "base")
    await ensure_topics(base.kafka)
    print(f"producing {cfg.events:,} events of {RECORD_BYTES} bytes ...", flush=True)
    records = make_events(cfg.events)
    await produce(tansu.bootstrap, base.kafka.feedback_topic, records)
    policy = SamplePolicy(
        kind_weights=base.samples.kind_weights,
        positive_rating_min=base.samples.positive_rating_min,
        negative_rating_max=base.samples.negative_rating_max,
        holdout_fraction=base.learning.holdout_fraction,
    )
    rows = _copy_rows(records, policy, base.kafka.max_record_bytes) if "copy" in cfg.phases else []
    # The benchmark's own copies of the records are not the engine's memory: keep the collector off them.
    gc.collect()
    gc.freeze()
    runs = []
    for number in range(1, cfg.repeat + 1):
        runs.append(await _one_repeat(cfg, base, suffix, admin_dsn, rows, tansu.pid, number))
    return summarise(cfg, runs)


# --------------------------------------------------------------------------------------------- --lines


def lines_settings(cfg: Config, bootstrap: str, suffix: str, dsn: str, group: str, lines: int) -> Settings:
    """(c)'s settings on a topic of its own for ``lines`` lines: one line is today's single-line configuration
    (``model.name``); more are one ``models:`` pattern matching them all."""
    line: dict[str, Any] = {"model": {"name": line_name(0)}} if lines == 1 else {"models": [{"pattern": "line-*"}]}
    return bench_settings(cfg, bootstrap, f"{suffix}-l{lines}", dsn, group, **line)


async def lines_main(cfg: Config, tansu: Tansu, admin_dsn: str) -> dict[str, Any]:
    """(c) with the events spread evenly over each number of lines of ``cfg.lines``, every repeat on fresh
    databases, the order of the counts alternating between repeats."""
    suffix = uuid.uuid4().hex[:8]
    for count in cfg.lines:
        settings = lines_settings(cfg, tansu.bootstrap, suffix, admin_dsn, "base", count)
        await ensure_topics(settings.kafka)
        print(f"producing {cfg.events:,} events of {RECORD_BYTES} bytes over {count} line(s) ...", flush=True)
        await produce(tansu.bootstrap, settings.kafka.feedback_topic, make_events(cfg.events, lines=count))
    gc.collect()
    gc.freeze()
    runs: list[dict[int, Result]] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        for number in range(1, cfg.repeat + 1):
            order = cfg.lines if number % 2 else tuple(reversed(cfg.lines))
            run: dict[int, Result] = {}
            for count in order:
                name = f"se_bench_{uuid.uuid4().hex[:10]}"
                dsn = create_database(admin_dsn, name)
                try:
                    settings = lines_settings(cfg, tansu.bootstrap, suffix, dsn, str(number), count)
                    run[count] = await run_ingest(settings, name, cfg.events, PgBackends(admin, name), tansu.pid)
                finally:
                    drop_database(admin_dsn, name)
                print(f"  repeat {number}: {count:>5} line(s) {run[count].events_per_s:>10,.0f} events/s", flush=True)
            runs.append(run)
    finally:
        await admin.close()
    one = min(cfg.lines)
    rows = {
        str(count): {
            "events_per_s": _median(run[count].events_per_s for run in runs),
            "cpu_us_per_event": _median(run[count].cpu_us_per_event for run in runs),
            "pg_cpu_us_per_event": _median(run[count].pg_cpu_us_per_event for run in runs),
            "vs_fewest": _median(run[count].events_per_s / run[one].events_per_s for run in runs),
            "vs_fewest_runs": [run[count].events_per_s / run[one].events_per_s for run in runs],
            "runs": [asdict(run[count]) for run in runs],
        }
        for count in cfg.lines
    }
    most = _median(run[max(cfg.lines)].events_per_s / run[one].events_per_s for run in runs)
    return {
        "benchmark": "ingest --lines",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "platform": platform.platform()},
        "config": {
            "events": cfg.events,
            "record_bytes": RECORD_BYTES,
            "repeat": cfg.repeat,
            "lines": cfg.lines,
            "partitions": cfg.partitions,
            "kafka.batch_max_records": cfg.batch_max_records,
            "window.max_samples": cfg.window_max_samples,
        },
        "lines": rows,
        "targets": {f"rate with {max(cfg.lines)} lines / {one} >= {LINES_TARGET:g}": _at_least(most, LINES_TARGET)},
    }


def lines_table(summary: dict[str, Any]) -> str:
    head = f"{'lines':>6} {'events/s':>10} {'CPU us/ev':>10} {'PG us/ev':>9} {'rate / fewest (per repeat)':>34}"
    out = [head, "-" * len(head)]
    for count, row in summary["lines"].items():
        each = ", ".join(f"{r:.2f}" for r in row["vs_fewest_runs"])
        out.append(
            f"{count:>6} {_fmt(row['events_per_s'], ',.0f'):>10} {_fmt(row['cpu_us_per_event'], '.1f'):>10}"
            f" {_fmt(row['pg_cpu_us_per_event'], '.1f'):>9} {row['vs_fewest']:>8.2f} ({each})"
        )
    ((target, met),) = summary["targets"].items()
    out.append(f"\n{target}: {'met' if met else 'MISSED'}")
    return "\n".join(out)


def run(cfg: Config) -> dict[str, Any]:
    """Start a tansu broker and reach PostgreSQL, run every repeat, stop/drop everything."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-pg-"))
    pg_dir.chmod(0o755)  # an embedded server runs as `nobody` when we are root
    tansu = Tansu(log_dir)
    try:
        tansu.start()
        admin_dsn = Postgres.connect_or_start(pg_dir / "data", log_dir)
        return asyncio.run(lines_main(cfg, tansu, admin_dsn) if cfg.lines else amain(cfg, tansu, admin_dsn))
    finally:
        tansu.stop()
        Postgres.stop_started()
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="records produced and ingested (default 50000)")
    parser.add_argument(
        "--naive-events", type=int, default=None,
        help="records the one-INSERT-per-event agent (d) handles (default: min(events, 10000); it is slow)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every phase (default 3)")
    parser.add_argument("--batch", type=int, default=1000, help="kafka.batch_max_records (default 1000)")
    parser.add_argument("--batch-wait", type=float, default=0.5, help="kafka.batch_max_wait_s (default 0.5)")
    parser.add_argument("--window", type=int, default=1000, help="window.max_samples (default 1000)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the feedback topic (default 6)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument(
        "--lines", default="",
        help="comma-separated numbers of model lines (1,100,1000): only (c), the events spread evenly over the lines, "
        "each rate compared with the fewest lines'",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="where to write JSON (default bench/results/...)")
    args = parser.parse_args(argv)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    try:
        lines = tuple(sorted({int(n) for n in args.lines.split(",") if n.strip()}))
    except ValueError:
        parser.error("--lines takes numbers separated by commas")
    if any(n < 1 for n in lines):
        parser.error("--lines: at least one line")
    json_path = args.json or Path("bench/results/ingest_lines.json" if lines else "bench/results/ingest.json")
    cfg = Config(
        events=args.events,
        naive_events=args.naive_events or min(args.events, 10_000),
        repeat=args.repeat,
        batch_max_records=args.batch,
        batch_max_wait_s=args.batch_wait,
        window_max_samples=args.window,
        partitions=args.partitions,
        json_path=json_path,
        phases=phases,
        lines=lines,
    )
    if cfg.naive_events > cfg.events:
        parser.error("--naive-events cannot exceed --events")
    logging.basicConfig(level=logging.WARNING)
    summary = run(cfg)
    print()
    print(lines_table(summary) if lines else table(summary))
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {cfg.json_path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
