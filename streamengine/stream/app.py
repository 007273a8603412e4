"""The ingest consumer: a Kafka consumer group feeding :class:`IngestPipeline` in batches.

A plain aiokafka consumer: up to ``kafka.batch_max_records`` records (waiting at most
``kafka.batch_max_wait_s`` after the first to fill a batch) are validated while the previous batch is
being written, then stored; batches are stored strictly in order, one at a time. Offsets are committed
(every ``kafka.commit_interval_s``, before partitions are given up, and on stop) only for batches the
pipeline has stored (DLQ records acknowledged, samples committed), so the committed offset never passes
a record whose side effects are not durable. A rebalance waits for the batch in flight to be stored and
committed before the partitions are given up; a commit that still loses the race (the partition moved
on) is harmless, as inserts are idempotent. State lives in PostgreSQL.

This is the default (``kafka.consumer: aiokafka``); ``kafka.consumer: faust`` runs the same pipeline in
a faust-streaming agent (:mod:`streamengine.stream.faust_app`), whose per-event machinery costs about
150 us of CPU per event, ten times the rest of the pipeline (``bench/ingest.py``, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from streamengine.config.settings import Settings
from streamengine.stream.ingest import Classified, IngestPipeline, Record

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
"""How long :meth:`IngestApp.stop` lets the batch in flight finish before cancelling it."""
READ_SLICE = 100
CLASSIFY_SLICE = 25
"""Records read, and classified, between two yields to the event loop (the write in flight waits for them)."""


class IngestConsumer:
    """What the engine reads about the consumer (assignment, lag): a view of the aiokafka consumer."""

    def __init__(self) -> None:
        self.kafka: AIOKafkaConsumer | None = None
        self.committed_offsets: dict[TopicPartition, int] = {}
        """Next offset to read per partition, as last committed by this replica."""
        self._committed_offset = self.committed_offsets  # the name faust's consumer used (engine.LagObserver)

    def assignment(self) -> set[TopicPartition]:
        return set(self.kafka.assignment()) if self.kafka is not None else set()

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset from the last fetch response (None before the first fetch)."""
        return self.kafka.highwater(tp) if self.kafka is not None else None

    async def position(self, tp: TopicPartition) -> int | None:
        return await self.kafka.position(tp) if self.kafka is not None else None


class _WaitForBatch(ConsumerRebalanceListener):
    """Partitions are given up only once the batch in flight is stored and its offsets committed."""

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self.app.batch_lock:
            if self.app.consumer.kafka is not None:
                await self.app._commit(self.app.consumer.kafka)
            for tp in revoked:
                self.app.consumer.committed_offsets.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("ingest assigned partitions %s", sorted(tp.partition for tp in assigned))


class IngestApp:
    """One ingest replica: ``start()`` joins the consumer group and runs the batch loop, ``stop()`` leaves."""

    def __init__(self, settings: Settings, pipeline: IngestPipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.consumer = IngestConsumer()
        self.batch_lock = asyncio.Lock()
        self.crashed = False
        self.crash_reason: BaseException | None = None
        self.should_stop = False
        self._task: asyncio.Task[None] | None = None
        self._stored: dict[TopicPartition, int] = {}
        """Offsets after the batches stored but not yet committed (committed every ``kafka.commit_interval_s``,
        before partitions are given up, and on stop)."""
        self._last_commit = 0.0

    async def start(self) -> None:
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, kafka.session_timeout_s / 3) * 1000),
            rebalance_timeout_ms=int(kafka.rebalance_timeout_s * 1000),
            max_poll_interval_ms=1_000_000,  # a batch may retry for a long time while PostgreSQL is down
            max_partition_fetch_bytes=max(kafka.max_record_bytes * 4, 4 * 1024 * 1024),
        )
        consumer.subscribe([kafka.feedback_topic], listener=_WaitForBatch(self))
        await consumer.start()
        self.consumer.kafka = consumer
        self.should_stop = False
        self._task = asyncio.create_task(self._run(consumer), name="ingest")

    async def stop(self) -> None:
        self.should_stop = True
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), STOP_GRACE_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.consumer.kafka is not None:
            await self.consumer.kafka.stop()  # leaves the group: its partitions move to the other replicas

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        """Read and classify batch k+1 while batch k is being written; commit each batch after its write."""
        pending: asyncio.Task[None] | None = None
        try:
            while not self.should_stop:
                records = await self._next_batch(consumer)
                if not records:
                    continue
                batch = await self._classify(records)
                if pending is not None:
                    await pending
                pending = asyncio.create_task(self._store(consumer, records, batch))
                await asyncio.sleep(0)  # let the write start before the next batch's CPU work
            if pending is not None:
                await pending
            async with self.batch_lock:
                await self._commit(consumer)
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

    async def _next_batch(self, consumer: AIOKafkaConsumer) -> list[Record]:
        """Up to ``batch_max_records`` records, waiting at most ``batch_max_wait_s`` after the first one."""
        kafka = self.settings.kafka
        wait_ms = int(kafka.batch_max_wait_s * 1000)
        records: list[Record] = []
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
            for items in got.values():
                records += items
            if not records and self._stored and time.monotonic() - self._last_commit >= kafka.commit_interval_s:
                async with self.batch_lock:  # idle: commit what the last batches stored (else lag stays > 0)
                    await self._commit(consumer)
            if len(records) >= kafka.batch_max_records:
                break
            if records:
                now = time.monotonic()
                deadline = deadline or now + kafka.batch_max_wait_s
                if now >= deadline:
                    break
                wait_ms = max(1, int((deadline - now) * 1000))
        return records

    async def _store(
        self,
        consumer: AIOKafkaConsumer,
        records: list[Record],
        batch: Classified,
    ) -> None:
        async with self.batch_lock:  # a rebalance waits for this batch to be stored and committed
            await self.pipeline.store(batch)  # retries until durable
            for record in records:  # in offset order per partition
                self._stored[TopicPartition(record.topic, record.partition)] = record.offset + 1
            if time.monotonic() - self._last_commit >= self.settings.kafka.commit_interval_s:
                await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets after the batches stored so far (under ``batch_lock``)."""
        assigned = consumer.assignment()
        offsets = {tp: offset for tp, offset in self._stored.items() if tp in assigned}
        self._stored.clear()  # partitions no longer assigned: their new owner reads from the last commit
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced meanwhile: the new owner reads from the last commit; duplicates are dropped.
            log.warning("offset commit skipped after a rebalance: %s", exc)
            return
        except KafkaError as exc:
            log.warning("offset commit failed (%s); retried with the next batch", exc)
            self._stored.update(offsets)
            return
        self._last_commit = time.monotonic()
        self.consumer.committed_offsets.update(offsets)


def build_app(settings: Settings, pipeline: IngestPipeline, datadir: Path) -> Any:
    """The ingest consumer of ``streamengine run``, as ``kafka.consumer`` chooses.

    Both have ``start()``/``stop()``, ``crashed``/``should_stop`` and a ``consumer`` whose assignment,
    highwater and committed offsets the engine reads. ``datadir`` is the faust app's folder.
    """
    if settings.kafka.consumer == "faust":
        from streamengine.stream.faust_app import build_faust_app

        return build_faust_app(settings, pipeline, datadir)
    return IngestApp(settings, pipeline)
