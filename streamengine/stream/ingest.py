"""The ingest pipeline: validate a batch of records, DLQ the bad ones, store the samples.

Independent of faust, so it can be driven by any consumer; ``stream/app.py`` wires it to a faust
agent. A batch is acknowledged by the caller only after :meth:`IngestPipeline.process` returns,
which happens only once the DLQ records are acknowledged by Kafka and the samples are committed in
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class RecordSender(Protocol):
    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        headers: list[tuple[str, bytes]] | None = ...,
    ) -> object: ...


def dlq_headers(record: RawRecord, error: EventRejected) -> list[tuple[str, bytes]]:
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

    def classify(self, records: list[RawRecord]) -> tuple[list[SampleAt], list[tuple[RawRecord, EventRejected]]]:
        """Split a batch into samples to store and records to reject (pure CPU work)."""
        good: list[SampleAt] = []
        bad: list[tuple[RawRecord, EventRejected]] = []
        limit = self.settings.kafka.max_record_bytes
        for record in records:
            try:
                event = decode_feedback(record.value, limit)
                if event.model not in self.models:
                    raise EventRejected("unknown_model", f"model line '{event.model[:100]}' is not configured here")
            except EventRejected as exc:
                bad.append((record, exc))
                continue
            good.append((to_sample(event, self.sample_policy), record.partition, record.offset))
        return good, bad

    async def process(self, records: list[RawRecord]) -> windows.BatchOutcome:
        """Handle one batch durably; retries until it succeeds (the caller acks afterwards)."""
        metrics.EVENTS_CONSUMED.inc(len(records))
        good, bad = self.classify(records)
        if bad:
            await self._with_retry("DLQ publish", lambda: self._send_to_dlq(bad))
            for _, exc in bad:
                metrics.EVENTS_REJECTED.labels(exc.error_class).inc()
        outcome = windows.BatchOutcome()
        if good:
            started = time.perf_counter()
            outcome = await self._with_retry(
                "sample write", lambda: windows.write_batch(self.db, good, self.window_policy)
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

    async def _send_to_dlq(self, bad: list[tuple[RawRecord, EventRejected]]) -> None:
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
