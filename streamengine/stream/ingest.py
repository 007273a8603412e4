"""The ingest pipeline: validate a batch of records, DLQ the bad ones, store the samples.

Independent of the Kafka client, so it can be driven by any consumer; ``stream/app.py`` wires it to a
consumer group. Two steps: :meth:`IngestPipeline.classify` (pure CPU: decode, validate, event ->
sample -> COPY line) and :meth:`IngestPipeline.store` (DLQ and PostgreSQL), so a consumer can classify
the next batch while the previous one is being written; :meth:`IngestPipeline.process` does both. A batch is
acknowledged by the caller only after ``store``/``process`` returns, which happens only once the DLQ
records are acknowledged by Kafka and the samples are committed in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from streamengine import metrics
from streamengine.config import Settings
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.errors import EventRejected, StreamEngineError
from streamengine.events import decode_feedback
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.store.windows import SampleAt

log = logging.getLogger(__name__)
T = TypeVar("T")


class Record(Protocol):
    """A consumed Kafka record as the pipeline reads it: an aiokafka ``ConsumerRecord`` or a :class:`RawRecord`."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(slots=True)
class Classified:
    """A batch split into samples to store (with their COPY lines, see ``windows.copy_line``) and rejects."""

    good: list[SampleAt] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    bad: list[tuple[Record, EventRejected]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.good) + len(self.bad)

    def extend(self, other: Classified) -> None:
        self.good += other.good
        self.lines += other.lines
        self.bad += other.bad


class RecordSender(Protocol):
    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        headers: list[tuple[str, bytes]] | None = ...,
    ) -> object: ...


def dlq_headers(record: Record, error: EventRejected) -> list[tuple[str, bytes]]:
    """The original headers plus why the record was rejected and where it came from."""
    ours = {
        "error.class": error.error_class,
        "error.message": str(error)[:1000],
        "source.topic": record.topic,
        "source.partition": str(record.partition),
        "source.offset": str(record.offset),
    }
    kept = [(k, v) for k, v in record.headers if k not in ours]
    return kept + [(k, v.encode()) for k, v in ours.items()]


class IngestPipeline:
    def __init__(self, settings: Settings, db: Database, sender: RecordSender) -> None:
        self.settings = settings
        self.db = db
        self.sender = sender
        self.sample_policy = SamplePolicy(
            kind_weights=settings.samples.kind_weights,
            positive_rating_min=settings.samples.positive_rating_min,
            negative_rating_max=settings.samples.negative_rating_max,
            holdout_fraction=settings.learning.holdout_fraction,
        )
        self.window_policy = WindowPolicy(
            max_samples=settings.window.max_samples,
            max_weight=settings.window.max_weight,
            min_samples=settings.window.min_samples,
        )
        self.models = {settings.model.name}
        self.retry_delays = (0.1, 0.5, 1.0, 2.0, 5.0)

    def classify(self, records: Sequence[Record]) -> Classified:
        """Split a batch into samples to store and records to reject (pure CPU work)."""
        batch = Classified()
        limit = self.settings.kafka.max_record_bytes
        for record in records:
            try:
                event = decode_feedback(record.value, limit)
                if event.model not in self.models:
                    raise EventRejected("unknown_model", f"model line '{event.model[:100]}' is not configured here")
            except EventRejected as exc:
                batch.bad.append((record, exc))
                continue
            row = (to_sample(event, self.sample_policy), record.partition, record.offset)
            batch.good.append(row)
            batch.lines.append(windows.copy_line(row))
        return batch

    async def process(self, records: Sequence[Record]) -> windows.BatchOutcome:
        """Handle one batch durably; retries until it succeeds (the caller acks afterwards)."""
        return await self.store(self.classify(records))

    async def store(self, batch: Classified) -> windows.BatchOutcome:
        """DLQ the rejected records and store the samples of one classified batch; retries until durable."""
        good, bad = batch.good, batch.bad
        metrics.EVENTS_CONSUMED.inc(len(good) + len(bad))
        if bad:
            await self._with_retry("DLQ publish", lambda: self._send_to_dlq(bad))
            for _, exc in bad:
                metrics.EVENTS_REJECTED.labels(exc.error_class).inc()
        outcome = windows.BatchOutcome()
        if good:
            started = time.perf_counter()
            outcome = await self._with_retry(
                "sample write", lambda: windows.write_batch(self.db, good, self.window_policy, batch.lines)
            )
            metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
            metrics.EVENTS_DEDUPLICATED.inc(outcome.duplicates)
            for sample, _, _ in good[:1]:
                metrics.SAMPLES_STORED.labels(sample.model).inc(outcome.inserted)
            for closed in outcome.closed:
                metrics.WINDOWS_CLOSED.labels(closed.model, closed.reason).inc()
                log.info(
                    "window %d of %s closed (%s): %d samples, weight %.2f -> job %d",
                    closed.window_id,
                    closed.model,
                    closed.reason,
                    closed.samples,
                    closed.weight,
                    closed.job_id,
                )
        return outcome

    async def _send_to_dlq(self, bad: list[tuple[Record, EventRejected]]) -> None:
        topic = self.settings.kafka.dlq_topic
        await asyncio.gather(
            *(
                self.sender.send_and_wait(topic, value=record.value, key=record.key, headers=dlq_headers(record, exc))
                for record, exc in bad
            )
        )

    async def _with_retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await action()
            except (StreamEngineError, OSError, ConnectionError, TimeoutError) as exc:
                failure: Exception = exc
            except Exception as exc:  # asyncpg and aiokafka errors: transient until proven otherwise
                if type(exc).__module__.split(".")[0] not in {"asyncpg", "aiokafka"}:
                    raise
                failure = exc
            delay = self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
            attempt += 1
            metrics.INGEST_RETRIES.inc()
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(failure).__name__, failure, attempt, delay)
            await asyncio.sleep(delay)
