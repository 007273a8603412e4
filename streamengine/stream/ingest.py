"""The ingest pipeline: validate a batch of records, DLQ the bad ones, store the samples.

Independent of the Kafka client, so it can be driven by any consumer; ``stream/app.py`` wires it to a
consumer group. Two steps: :meth:`IngestPipeline.classify` (pure CPU: decode, validate, event ->
sample -> COPY line) and :meth:`IngestPipeline.store` (DLQ and PostgreSQL), so a consumer can classify
the next batch while the previous one is being written; :meth:`IngestPipeline.process` does both. A batch is
acknowledged by the caller only after ``store``/``process`` returns, which happens only once the DLQ
records are acknowledged by Kafka and the samples are committed in PostgreSQL.

A write PostgreSQL refuses for the values it carries (a check constraint, a string too long, a character the
database encoding lacks) is not retried: the batch is halved until the records it refuses are found, they go
to the DLQ (``error.class`` ``database_<condition>``) and the rest is stored. Any other failure is retried
until it passes (:func:`~streamengine.errors.is_transient`) or stops ingest (a statement PostgreSQL refuses
whatever it carries: a missing table, a missing permission).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import Counter as CounterChild

from streamengine import metrics
from streamengine.config.lines import Lines
from streamengine.config.settings import Settings
from streamengine.contract.events import decode_fields
from streamengine.core.backoff import Backoff
from streamengine.core.rollout import Outcome, outcome
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.errors import ConfigError, EventRejected, StreamEngineError, data_rejection, is_transient
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.store.windows import SampleAt
from streamengine.stream.redaction import build_redactor

log = logging.getLogger(__name__)
T = TypeVar("T")
DLQ_PREVIEW_BYTES = 65_536
"""What a DLQ record keeps of a value too large for the producer or the DLQ topic to take whole."""
POLICY_CACHE_MAX = 65_536
"""Most line names whose policies ingest remembers at once."""


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
    @property
    def timestamp(self) -> int | None:
        """When the record entered Kafka (ms since the epoch; negative or None: unknown)."""
        ...


def record_bytes(record: Record) -> int:
    """A record's key, value and headers in bytes (what ``kafka.batch_max_bytes`` bounds)."""
    headers = sum(len(name) + len(value or b"") for name, value in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int | None = None


@dataclass(slots=True)
class Classified:
    """A batch split into samples to store (with their COPY lines, see ``windows.copy_line``, their records, the
    records' timestamps and the events' outcomes) and rejects."""

    good: list[SampleAt] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    produced_ms: list[int | None] = field(default_factory=list)
    outcomes: list[Outcome | None] = field(default_factory=list)
    bad: list[tuple[Record, EventRejected]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    """The fields cut to the length limits, one entry per cut (``prompt``, ``completion``)."""

    def __len__(self) -> int:
        return len(self.good) + len(self.bad)

    def extend(self, other: Classified) -> None:
        self.good += other.good
        self.lines += other.lines
        self.records += other.records
        self.produced_ms += other.produced_ms
        self.outcomes += other.outcomes
        self.bad += other.bad
        self.truncated += other.truncated

    def part(self, start: int, end: int) -> Classified:
        """The good rows ``start:end`` (and no rejects)."""
        return Classified(
            self.good[start:end],
            self.lines[start:end],
            self.records[start:end],
            self.produced_ms[start:end],
            self.outcomes[start:end],
        )


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
        self.lines = Lines(settings)
        self._policies: dict[str, tuple[SamplePolicy, WindowPolicy] | None] = {}
        self._stored: dict[str, CounterChild] = {}
        """``samples_stored_total``'s child of each line (``labels`` costs more than the increment)."""
        self.redactor = build_redactor(settings.privacy)  # privacy.function is imported here, once
        self.retry = Backoff(first_s=0.1, max_s=5.0)
        self.look_first = True
        """Look for stored samples before writing a batch: after a batch that held duplicates (as after a restart,
        when the records not yet committed are read again), else the COPY finds them."""

    def policies(self, model: str) -> tuple[SamplePolicy, WindowPolicy] | None:
        """The sample and window policies of line ``model`` (None: no configured line matches it), remembered per
        name: a lookup costs the same however many lines there are."""
        try:
            return self._policies[model]
        except KeyError:
            pass
        found = None
        if self.lines.matches(model):
            line = self.lines.for_line(model)
            found = (
                SamplePolicy(
                    kind_weights=line.samples.kind_weights,
                    positive_rating_min=line.samples.positive_rating_min,
                    negative_rating_max=line.samples.negative_rating_max,
                    holdout_fraction=line.learning.holdout_fraction,
                    max_prompt_chars=line.samples.max_prompt_chars,
                    max_completion_chars=line.samples.max_completion_chars,
                    overlength=line.samples.overlength,
                ),
                WindowPolicy(
                    max_samples=line.window.max_samples,
                    max_weight=line.window.max_weight,
                    min_samples=line.window.min_samples,
                ),
            )
        if len(self._policies) >= POLICY_CACHE_MAX:  # a flood of distinct unknown names cannot grow it further
            self._policies.clear()
        self._policies[model] = found
        return found

    def _stored_counter(self, model: str) -> CounterChild:
        try:
            return self._stored[model]
        except KeyError:
            pass
        if len(self._stored) >= POLICY_CACHE_MAX:
            self._stored.clear()
        child = self._stored[model] = metrics.SAMPLES_STORED.labels(model)
        return child

    def window_policy(self, model: str) -> WindowPolicy:
        """The window policy of a configured line ``model``."""
        found = self.policies(model)
        if found is None:
            raise ConfigError(f"model line '{model[:100]}' matches no configured line")
        return found[1]

    def classify(self, records: Sequence[Record]) -> Classified:
        """Split a batch into samples to store and records to reject (pure CPU work)."""
        batch = Classified()
        limit, max_messages = self.settings.kafka.max_record_bytes, self.settings.samples.max_messages
        redactions: dict[str, int] = {}
        for record in records:
            try:
                event = decode_fields(record.value, limit, max_messages)
                policies = self.policies(event.model)
                if policies is None:
                    raise EventRejected("unknown_model", f"model line '{event.model[:100]}' is not configured here")
                event = self.redactor.event(event, redactions)  # privacy: nothing unredacted is stored
                row = (to_sample(event, policies[0]), record.partition, record.offset)
                line = windows.copy_line(row)
            except EventRejected as exc:
                batch.bad.append((record, exc))
                continue
            except Exception as exc:  # a bug, not the record's fault alone: DLQ it rather than stop ingest on it
                log.exception("record %s[%d]@%d broke validation", record.topic, record.partition, record.offset)
                batch.bad.append((record, EventRejected("internal_error", f"validation failed: {type(exc).__name__}")))
                continue
            batch.good.append(row)
            batch.lines.append(line)
            batch.records.append(record)
            batch.produced_ms.append(record.timestamp)
            batch.outcomes.append(outcome(event.kind, event.rating) if event.adapter_version is not None else None)
            if row[0].truncated:
                batch.truncated += row[0].truncated
        for kind, hits in redactions.items():
            metrics.REDACTIONS.labels(kind).inc(hits)
        return batch

    async def process(self, records: Sequence[Record]) -> windows.BatchOutcome:
        """Handle one batch durably; retries until it succeeds (the caller acks afterwards)."""
        return await self.store(self.classify(records))

    async def store(self, batch: Classified) -> windows.BatchOutcome:
        """DLQ the rejected records and store the samples of one classified batch; retries until durable."""
        metrics.EVENTS_CONSUMED.inc(len(batch))
        await self._reject(batch.bad)
        outcome = windows.BatchOutcome()
        if batch.good:
            started = time.perf_counter()
            refused: list[tuple[Record, EventRejected]] = []
            outcome = await self._write(batch, refused)
            self.look_first = outcome.duplicates > 0
            metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
            await self._reject(refused)
            metrics.EVENTS_DEDUPLICATED.inc(outcome.duplicates)
            metrics.EVENTS_FORGOTTEN.inc(outcome.forgotten)
            for cut in batch.truncated:
                metrics.SAMPLES_TRUNCATED.labels(cut).inc()
            for model, inserted in outcome.inserted_by_model.items():
                self._stored_counter(model).inc(inserted)
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

    async def _reject(self, bad: list[tuple[Record, EventRejected]]) -> None:
        if bad:
            await self._with_retry("DLQ publish", lambda: self._send_to_dlq(bad))
            for _, exc in bad:
                metrics.EVENTS_REJECTED.labels(exc.error_class).inc()

    async def _write(self, batch: Classified, refused: list[tuple[Record, EventRejected]]) -> windows.BatchOutcome:
        """Store ``batch``'s samples; when PostgreSQL refuses them for their values, store its halves apart until
        the refused records are found (added to ``refused``, in batch order)."""
        try:
            return await self._with_retry(
                "sample write",
                lambda: windows.write_batch(
                    self.db,
                    batch.good,
                    self.window_policy,
                    batch.lines,
                    batch.produced_ms,
                    self.look_first,
                    batch.outcomes,
                ),
            )
        except Exception as exc:
            reason = data_rejection(exc)
            if reason is None:
                raise
            if len(batch.good) == 1:
                record, why = (
                    batch.records[0],
                    f"PostgreSQL refused the sample (SQLSTATE {getattr(exc, 'sqlstate', '?')}): {exc}",
                )
                log.warning("record %s[%d]@%d to the DLQ: %s", record.topic, record.partition, record.offset, why)
                refused.append((record, EventRejected(reason, why)))
                return windows.BatchOutcome()
        half = len(batch.good) // 2
        outcome = await self._write(batch.part(0, half), refused)
        outcome.add(await self._write(batch.part(half, len(batch.good)), refused))
        return outcome

    async def _send_to_dlq(self, bad: list[tuple[Record, EventRejected]]) -> None:
        await asyncio.gather(*(self._dlq_one(record, exc) for record, exc in bad))

    async def _dlq_one(self, record: Record, error: EventRejected) -> None:
        topic = self.settings.kafka.dlq_topic
        try:
            headers = dlq_headers(record, error)
            await self.sender.send_and_wait(topic, value=record.value, key=record.key, headers=headers)
        except MessageSizeTooLargeError:
            # Retrying cannot help (the producer's max request or the topic's max message size): keep a preview.
            value = record.value or b""
            note = f"DLQ value cut to its first {DLQ_PREVIEW_BYTES} of {len(value)} bytes, original headers dropped"
            slim = RawRecord(record.topic, record.partition, record.offset, None, None, [])
            headers = dlq_headers(slim, EventRejected(error.error_class, f"{note}: {error}"))
            key = record.key[:1024] if record.key is not None else None
            await self.sender.send_and_wait(topic, value=value[:DLQ_PREVIEW_BYTES], key=key, headers=headers)

    async def _with_retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` until it succeeds, retrying (without limit) failures that may pass."""
        attempt = 0
        while True:
            try:
                return await action()
            except Exception as exc:
                if not (isinstance(exc, StreamEngineError) or is_transient(exc)):
                    raise
                failure = exc
            attempt += 1
            delay = self.retry.delay(attempt)
            metrics.INGEST_RETRIES.inc()
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(failure).__name__, failure, attempt, delay)
            await asyncio.sleep(delay)
