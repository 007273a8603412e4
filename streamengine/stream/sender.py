"""At-least-once delivery of Kafka records through a bounded buffer: what the serving nodes' feedback
producer (:class:`streamengine.serving.FeedbackProducer`) and ``streamengine produce`` send with.

A record is taken into the buffer (``send`` waits while the buffer is full, or raises :class:`BufferFull`),
handed to aiokafka, and leaves the buffer only when Kafka acknowledges it, when the broker refuses it for
good, or when :meth:`RecordSender.close` gives it back. A transient failure (broker down, leader moving,
an attempt past its timeout) puts the record back in line and sending pauses with back-off, for as long
as it takes. A record may be stored twice (an attempt reached the broker, its acknowledgement did not):
feedback events carry ``event_id`` and ingest drops the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from streamengine.config.settings import KafkaSettings
from streamengine.contract import cloudevents
from streamengine.contract.events import FEEDBACK_TYPE, FeedbackEvent
from streamengine.core.backoff import Backoff
from streamengine.errors import BufferFull, Undelivered
from streamengine.stream.producer import request_bytes, start_producer

log = logging.getLogger(__name__)

_PARTITIONER = DefaultPartitioner()
"""What aiokafka's ``send`` uses: murmur2 of the key, as every Kafka client (a random partition without one)."""
RETRY = Backoff(0.2, 5.0, jitter=0.5)
"""Pause after a transient failure: 0.2 s doubling to 5 s (a burst of failures counts once)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record, with the event id and model line it carries (for reports and metrics)."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    event_id: str | None = None
    model: str | None = None


def feedback_record(event: FeedbackEvent, value: bytes) -> Record:
    """``value`` (``event`` as JSON) as the contract sends it: keyed by user id, else session id, with the
    CloudEvents headers."""
    key = event.user_id or event.session_id
    headers = cloudevents.as_kafka(cloudevents.headers(event.event_id, FEEDBACK_TYPE, event.timestamp))
    return Record(key.encode() if key else None, value, headers, event.event_id, event.model)


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where Kafka stored a record."""

    record: Record
    partition: int
    offset: int


@dataclass(eq=False, slots=True)
class _Entry:
    record: Record
    future: asyncio.Future[Delivered]
    acked: asyncio.Future[Any] | None = None
    """The future of the batch that carries it, while in flight."""
    index: int = 0
    """Its place in that batch (its offset is the batch's plus this)."""


def _transient(exc: BaseException) -> bool:
    """Worth another attempt: aiokafka's retriable errors and an attempt past its timeout (broker away)."""
    return isinstance(exc, KafkaTimeoutError | OSError) or (isinstance(exc, KafkaError) and exc.retriable)


class RecordSender:
    """Sends records to ``topic`` at least once, holding at most ``max_buffered`` unacknowledged ones.

    ``block``: a full buffer makes :meth:`send` wait (back-pressure) or, when False, raise :class:`BufferFull`.
    ``attempt_timeout_s``: how long one attempt may take before it is tried again (aiokafka's request timeout).
    ``on_settled(record, outcome)`` is called as each record leaves the buffer. Records go out in batches, one
    per partition and turn of the sending task, to the partition aiokafka's default partitioner gives their key.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        *,
        max_buffered: int = 10_000,
        block: bool = True,
        attempt_timeout_s: float = 15.0,
        on_settled: Callable[[Record, Delivered | Undelivered], None] | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.kafka, self.topic, self.max_buffered, self.block = kafka, topic, max_buffered, block
        self.attempt_timeout_s, self.on_settled = attempt_timeout_s, on_settled
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._retrying: deque[_Entry] = deque()
        self._waiting: deque[_Entry] = deque()
        self._in_flight: set[_Entry] = set()
        self._wake, self._space, self._empty = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._empty.set()
        self._failures = 0
        self._pause_until = 0.0
        self._closing = self._closed = False
        self._undelivered: list[Record] = []

    @property
    def buffered(self) -> int:
        """Records taken and not yet acknowledged, refused or given back."""
        return len(self._retrying) + len(self._waiting) + len(self._in_flight)

    async def start(self) -> None:
        """Connect (:class:`ServiceUnavailable` when the broker cannot be reached) and start sending."""
        self._producer = await start_producer(
            self.kafka,
            request_timeout_ms=int(self.attempt_timeout_s * 1000),
            max_batch_size=request_bytes(self.kafka),  # any record a request can carry fits a batch
        )
        self._task = asyncio.create_task(self._run(), name=f"streamengine-sender-{self.topic}")

    async def send(self, record: Record) -> asyncio.Future[Delivered]:
        """Take ``record`` into the buffer (waiting for room, or :class:`BufferFull`); the future is resolved when
        Kafka acknowledges it, or fails with :class:`Undelivered`."""
        while self.buffered >= self.max_buffered and not self._closing:
            if not self.block:
                raise BufferFull(self.max_buffered)
            self._space.clear()
            await self._space.wait()
        return self.put(record)

    def put(self, record: Record) -> asyncio.Future[Delivered]:
        """:meth:`send` without waiting: :class:`BufferFull` when there is no room."""
        if self._task is None:
            raise RuntimeError("the sender is not started")
        if self._closing:
            raise Undelivered("the producer is closing: the record was not taken", [record])
        if self.buffered >= self.max_buffered:
            raise BufferFull(self.max_buffered)
        entry = _Entry(record, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._empty.clear()
        self._wake.set()
        return entry.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._retrying or self._waiting):
                self._wake.clear()
                await self._wake.wait()
            elif (pause := self._pause_until - loop.time()) > 0:
                await asyncio.sleep(pause)
            else:
                await self._send_queued()

    async def _send_queued(self) -> None:
        """One batch per partition of what is queued, retries first; what does not fit, or is not shipped when
        a failure pauses sending (or the task is cancelled), goes back to the head of the line."""
        assert self._producer is not None
        entries = [*self._retrying, *self._waiting]
        self._retrying.clear()
        self._waiting.clear()
        try:
            partitions = sorted(await self._producer.partitions_for(self.topic))
        except asyncio.CancelledError:
            self._retrying.extendleft(reversed(entries))
            raise
        except Exception as exc:  # no metadata: the broker is away
            for entry in entries:
                self._failed(entry, exc)
            return
        groups: dict[int, deque[_Entry]] = {}
        for entry in entries:
            groups.setdefault(_PARTITIONER(entry.record.key, partitions, partitions), deque()).append(entry)
        loop = asyncio.get_running_loop()
        try:  # one batch for each partition, so that every request to a broker carries all its partitions
            for partition, group in groups.items():
                if self._pause_until > loop.time():
                    break
                await self._ship(partition, group)
        finally:
            self._retrying.extendleft(reversed([entry for group in groups.values() for entry in group]))

    async def _ship(self, partition: int, group: deque[_Entry]) -> None:
        """Send the head of ``group`` as one batch (as many records as fit)."""
        assert self._producer is not None
        batch, members = self._producer.create_batch(), []
        while group:
            record = group[0].record
            if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                break
            members.append(group.popleft())
        if not members:  # larger than a whole request
            self._failed(group.popleft(), MessageSizeTooLargeError(f"a record of {len(record.value)} bytes"))
            return
        try:
            acked = await self._producer.send_batch(batch, self.topic, partition=partition)
        except asyncio.CancelledError:
            group.extendleft(reversed(members))
            raise
        except Exception as exc:  # aiokafka raises KafkaError; anything else is refused in _failed
            for entry in members:
                self._failed(entry, exc)
            return
        for index, entry in enumerate(members):
            entry.acked, entry.index = acked, index
        self._in_flight.update(members)
        acked.add_done_callback(partial(self._batch_acked, members))

    def _batch_acked(self, members: list[_Entry], _: asyncio.Future[Any]) -> None:
        for entry in members:
            self._acked(entry)

    def _acked(self, entry: _Entry) -> None:
        if entry not in self._in_flight or entry.acked is None:  # settled already (at close)
            return
        self._in_flight.discard(entry)
        acked = entry.acked
        error = asyncio.CancelledError() if acked.cancelled() else acked.exception()
        if error is not None:
            self._failed(entry, error)
            return
        self._failures = 0
        metadata = acked.result()
        self._settle(entry, Delivered(entry.record, metadata.partition, metadata.offset + entry.index))

    def _failed(self, entry: _Entry, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError) or _transient(error):
            if self._closed:
                self._undelivered.append(entry.record)
                self._settle(entry, Undelivered("not acknowledged by Kafka before the producer closed", [entry.record]))
                return
            now = asyncio.get_running_loop().time()
            if now >= self._pause_until:
                self._failures += 1
                self._pause_until = now + RETRY.delay(self._failures, random.random())
                log.warning(
                    "Kafka did not acknowledge a record for %s (%s): trying again in %.1f s, %d records buffered",
                    self.topic, str(error) or type(error).__name__, self._pause_until - now, self.buffered + 1,
                )  # fmt: skip
            self._retrying.append(entry)
            self._wake.set()
            return
        why = str(error) or type(error).__name__
        self._settle(entry, Undelivered(f"Kafka refused the record: {why}", [entry.record], "refused"))

    def _settle(self, entry: _Entry, outcome: Delivered | Undelivered) -> None:
        if not entry.future.done():
            if isinstance(outcome, Delivered):
                entry.future.set_result(outcome)
            else:
                entry.future.set_exception(outcome)
                entry.future.exception()  # marked retrieved: close() and the callbacks report it, not asyncio's log
        if self.on_settled is not None:
            self.on_settled(entry.record, outcome)
        if self.buffered < self.max_buffered:
            self._space.set()
        if self.buffered == 0:
            self._empty.set()

    async def close(self, timeout_s: float = 30.0) -> list[Record]:
        """Take no more records, wait up to ``timeout_s`` for the buffer to drain, disconnect, and return the
        records Kafka has not acknowledged (their futures fail with :class:`Undelivered`). The disconnect waits
        for attempts under way, up to ``attempt_timeout_s`` more."""
        if self._task is None or self._closed:
            return []
        self._closing = True
        self._space.set()  # senders waiting for room raise Undelivered
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        self._closed = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        assert self._producer is not None
        await self._producer.stop()  # what aiokafka holds ends acknowledged or failed
        for entry in [e for e in self._in_flight if e.acked is not None and e.acked.done()]:
            self._acked(entry)
        left = [*self._in_flight, *self._retrying, *self._waiting]
        self._in_flight.clear()
        self._retrying.clear()
        self._waiting.clear()
        for entry in left:
            self._failed(entry, asyncio.CancelledError())
        return self._undelivered
