"""The ingest consumers: a Kafka consumer group feeding :class:`IngestPipeline` in batches.

:class:`IngestApp` is a plain aiokafka consumer: up to ``kafka.batch_max_records`` records and
``kafka.batch_max_bytes`` bytes (waiting at most ``kafka.batch_max_wait_s`` after the first to fill a batch)
are validated while the previous batch is being written, then stored; batches are stored strictly in order,
one at a time. Memory stays bounded whatever the records' size: two batches and one fetch ahead
(``fetch_max_bytes`` is ``batch_max_bytes`` too). A batch that may fill the open window (as many records as
the window still takes samples) is written without waiting for the timer, so the window closes, and its job
starts, as soon as its last event arrives. Which offsets are
committed, and when, is the :class:`~streamengine.stream.checkpoint.Checkpoint`'s: only offsets after
batches the pipeline has stored, so the committed offset never passes a record whose side effects are not
durable. State lives in PostgreSQL.

This is the default (``kafka.consumer: aiokafka``); ``kafka.consumer: faust`` runs the same pipeline in
a faust-streaming agent (:mod:`streamengine.stream.faust_app`), whose per-event machinery costs about
150 us of CPU per event, ten times the rest of the pipeline (``bench/ingest.py``, docs/performance.md).
Both are an :class:`IngestConsumer`, which is what the engine and the admin API use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streamengine import metrics
from streamengine.config.settings import Settings
from streamengine.stream import security
from streamengine.stream.checkpoint import Checkpoint
from streamengine.stream.ingest import Classified, IngestPipeline, Record, record_bytes

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
"""How long :meth:`IngestApp.stop` lets the batch in flight finish before cancelling it."""
READ_SLICE = 100
CLASSIFY_SLICE = 25
"""Records read, and classified, between two yields to the event loop (the write in flight waits for them)."""


class IngestConsumer(Protocol):
    """An ingest consumer as the engine drives it and reads it (health, consumer lag)."""

    @property
    def crashed(self) -> bool: ...
    @property
    def should_stop(self) -> bool: ...
    @property
    def crash_reason(self) -> BaseException | None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def assignment(self) -> set[TopicPartition]:
        """The partitions this replica consumes now."""
        ...

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset from the last fetch response (None before the first fetch)."""
        ...

    def committed(self, tp: TopicPartition) -> int | None:
        """The next offset to read, as this replica last committed it (None before its first commit)."""
        ...

    async def position(self, tp: TopicPartition) -> int | None:
        """The next offset this replica will fetch."""
        ...


class IngestApp:
    """One ingest replica: ``start()`` joins the consumer group and runs the batch loop, ``stop()`` leaves."""

    def __init__(self, settings: Settings, pipeline: IngestPipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.kafka: AIOKafkaConsumer | None = None
        self.checkpoint: Checkpoint | None = None
        self.crashed = False
        self.crash_reason: BaseException | None = None
        self.should_stop = False
        self._task: asyncio.Task[None] | None = None
        self._room: int | None = None
        """Trainable samples the open window still takes (after the last stored batch); None: not known yet."""
        self._in_flight = 0
        """Records of the batch being stored: each may be a trainable sample of that window."""

    async def start(self) -> None:
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            **security.client_options(kafka),
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, kafka.session_timeout_s / 3) * 1000),
            rebalance_timeout_ms=int(kafka.rebalance_timeout_s * 1000),
            max_poll_interval_ms=1_000_000,  # a batch may retry for a long time while PostgreSQL is down
            fetch_max_bytes=kafka.batch_max_bytes,  # what is fetched ahead is bounded like a batch
            max_partition_fetch_bytes=max(kafka.max_record_bytes, min(4 * 1024 * 1024, kafka.batch_max_bytes)),
        )
        checkpoint = Checkpoint(consumer, kafka.commit_interval_s)
        consumer.subscribe([kafka.feedback_topic], listener=checkpoint)
        await security.start(consumer, kafka)
        self.kafka, self.checkpoint = consumer, checkpoint
        self.should_stop = False
        self._task = asyncio.create_task(self._run(consumer, checkpoint), name="ingest")

    async def stop(self) -> None:
        self.should_stop = True
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), STOP_GRACE_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.kafka is not None:
            await self.kafka.stop()  # leaves the group: its partitions move to the other replicas

    def assignment(self) -> set[TopicPartition]:
        return set(self.kafka.assignment()) if self.kafka is not None else set()

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.kafka.highwater(tp) if self.kafka is not None else None

    def committed(self, tp: TopicPartition) -> int | None:
        return self.checkpoint.committed.get(tp) if self.checkpoint is not None else None

    async def position(self, tp: TopicPartition) -> int | None:
        return await self.kafka.position(tp) if self.kafka is not None else None

    async def _run(self, consumer: AIOKafkaConsumer, checkpoint: Checkpoint) -> None:
        """Read and classify batch k+1 while batch k is being written; commit each batch after its write."""
        pending: asyncio.Task[None] | None = None
        try:
            while not self.should_stop:
                records = await self._next_batch(consumer, checkpoint)
                if not records:
                    continue
                batch = await self._classify(records)
                if pending is not None:
                    await pending
                self._in_flight = len(records)
                pending = asyncio.create_task(self._store(checkpoint, records, batch))
                await asyncio.sleep(0)  # let the write start before the next batch's CPU work
            if pending is not None:
                await pending
            async with checkpoint.lock:
                await checkpoint.commit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.crashed, self.crash_reason = True, exc
            log.exception("ingest stopped: %s", exc)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending

    async def _classify(self, records: list[Record]) -> Classified:
        """The pipeline's pure CPU step, in slices, so the write in flight gets its replies promptly."""
        batch = Classified()
        for start in range(0, len(records), CLASSIFY_SLICE):
            if start:
                await asyncio.sleep(0)
            batch.extend(self.pipeline.classify(records[start : start + CLASSIFY_SLICE]))
        return batch

    async def _next_batch(self, consumer: AIOKafkaConsumer, checkpoint: Checkpoint) -> list[Record]:
        """Up to ``batch_max_records`` records and ``batch_max_bytes`` bytes (at least one record), waiting at
        most ``batch_max_wait_s`` after the first one."""
        kafka = self.settings.kafka
        wait_ms = int(kafka.batch_max_wait_s * 1000)
        records: list[Record] = []
        size = 0
        deadline = 0.0
        while not self.should_stop:
            if records:
                await asyncio.sleep(0)  # reading a batch is CPU work too: let the write in flight proceed
            try:
                got = await consumer.getmany(
                    timeout_ms=wait_ms, max_records=min(kafka.batch_max_records - len(records), READ_SLICE)
                )
            except KafkaError as exc:  # the broker is away: the records read so far wait, nothing is lost
                log.warning("reading %s failed (%s); retrying", kafka.feedback_topic, exc)
                await asyncio.sleep(1.0)
                continue
            size, full = _take(consumer, got, records, size, kafka.batch_max_bytes)
            if not records and checkpoint.due():
                async with checkpoint.lock:  # idle: commit what the last batches stored (else lag stays > 0)
                    await checkpoint.commit()
            if full or len(records) >= kafka.batch_max_records or self._could_fill(len(records)):
                break
            if records:
                now = time.monotonic()
                deadline = deadline or now + kafka.batch_max_wait_s
                if now >= deadline:
                    break
                wait_ms = max(1, int((deadline - now) * 1000))
        if records:
            metrics.INGEST_BATCH_BYTES.observe(size)
        return records

    def _could_fill(self, records: int) -> bool:
        """Whether a batch of ``records`` may fill the open window: then it is written at once, not after the batch
        timer, so the window closes (and its job starts) as soon as its last event arrives."""
        return self._room is not None and records >= self._room - self._in_flight

    async def _store(self, checkpoint: Checkpoint, records: list[Record], batch: Classified) -> None:
        async with checkpoint.lock:  # a rebalance waits for this batch to be stored and committed
            outcome = await self.pipeline.store(batch)  # retries until durable
            if outcome.open_samples:  # one line's window (several lines: the one closest to closing decides)
                policy = self.pipeline.window_policy
                self._room = min(policy(model).max_samples - held for model, held in outcome.open_samples.items())
            self._in_flight = 0
            checkpoint.stored(records)
            if checkpoint.due():
                await checkpoint.commit()


_KEY_BYTES, _VALUE_BYTES, _HEADERS = (
    attrgetter(name) for name in ("serialized_key_size", "serialized_value_size", "headers")
)


def _take(
    consumer: AIOKafkaConsumer,
    got: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    records: list[Record],
    size: int,
    limit: int,
) -> tuple[int, bool]:
    """Append to ``records`` (of ``size`` bytes) what of ``got`` fits in ``limit`` bytes; a partition's records that
    do not fit are fetched again for the next batch. The batch's bytes, and whether it is full."""
    full = False
    for tp, items in got.items():
        taken, took = _fitting(items, limit - size, bool(records))
        records += items[:taken] if taken < len(items) else items
        size += took
        if taken < len(items):
            full = True
            if tp in consumer.assignment():
                consumer.seek(tp, items[taken].offset)
    return size, full or size >= limit


def _fitting(items: Sequence[ConsumerRecord[bytes, bytes]], room: int, started: bool) -> tuple[int, int]:
    """How many of ``items`` (from the start) fit in ``room`` bytes, at least one unless the batch has ``started``,
    and their bytes. Summed in C in the common case (no headers, all of them fit)."""
    if not any(map(_HEADERS, items)):
        total = sum(map(_KEY_BYTES, items)) + sum(map(_VALUE_BYTES, items))  # a null is -1: a byte too few
        if total <= room:
            return len(items), total
    sizes = list(accumulate(map(record_bytes, items)))
    count = max(bisect_right(sizes, room), 0 if started else 1)
    return count, sizes[count - 1] if count else 0


def build_app(settings: Settings, pipeline: IngestPipeline, datadir: Path) -> IngestConsumer:
    """The ingest consumer of ``streamengine run``, as ``kafka.consumer`` chooses (``datadir``: the faust app's
    folder)."""
    if settings.kafka.consumer == "faust":
        from streamengine.stream.faust_app import build_faust_app

        return build_faust_app(settings, pipeline, datadir)
    return IngestApp(settings, pipeline)
