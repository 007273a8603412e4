"""The serving node's other half: feedback from its users to ``feedback.events``, as the contract says.

:class:`FeedbackProducer` (asyncio) and :class:`SyncFeedbackProducer` (threaded servers) validate each event
where it is sent (a bad one raises :class:`InvalidFeedback` naming the field and never reaches the topic),
fill ``event_id`` (a UUIDv7) and ``timestamp`` when absent, stamp ``adapter_version`` with the version that
serves the model line (from a :class:`~streamengine.serving.Subscriber` or a function), key each record by
user id, else session id, and set the CloudEvents headers. Delivery is at least once through a bounded
buffer (:mod:`streamengine.stream.sender`): ``send`` waits while it is full (or raises :class:`BufferFull`),
each send gives a future of its acknowledgement, and what is not delivered by ``close()`` is returned.
Base install only: no torch, no database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from streamengine.config.settings import Settings
from streamengine.contract.events import FeedbackEvent, decode_fields
from streamengine.errors import BufferFull, EventRejected, InvalidFeedback, Undelivered
from streamengine.serving.metrics import FEEDBACK_BUFFERED, FEEDBACK_FAILED, FEEDBACK_SENT
from streamengine.stream.sender import Delivered, Record, RecordSender, feedback_record

_T = TypeVar("_T")
_JSON = TypeAdapter(FeedbackEvent)
"""Writes an event as JSON bytes (``model_dump_json`` gives a str to encode again)."""


class ServedVersion(Protocol):
    """What a :class:`~streamengine.serving.Subscriber` offers: its model line and the version it serves now."""

    @property
    def model(self) -> str: ...

    @property
    def current(self) -> str | None: ...


VersionSource = ServedVersion | Callable[[str], str | None]
"""A subscriber, or a function from a model line to the adapter version serving it (None: not known)."""
DeliveryCallback = Callable[[Record, Undelivered | None], None]
"""Called once per event taken: with None when Kafka acknowledged it, else with the :class:`Undelivered` error."""


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits; ids sort by creation time."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big") >> 6
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    digits = f"{value:032x}"  # str(uuid.UUID(int=value)), at half its cost
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _lookup(source: VersionSource | None) -> Callable[[str], str | None] | None:
    if source is None or callable(source):
        return source
    return lambda model: source.current if model == source.model else None


def _invalid(exc: ValidationError) -> InvalidFeedback:
    """The first problem of ``exc`` as one line naming its field (no input values: they may be user text)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InvalidFeedback("schema", f"{field or 'event'}: {first['msg']}{more}", field)


class FeedbackProducer:
    """Sends feedback events to ``kafka.feedback_topic`` (or ``topic``) at least once.

    ``model``: the model line of events that name none (default ``model.name``). ``versions``: where
    ``adapter_version`` comes from when an event has none (a Subscriber: its current version, for its
    model line only). ``max_buffered`` events may wait for their acknowledgement; with ``block=False`` a
    send beyond that raises :class:`BufferFull` instead of waiting. ``on_delivery(record, error)`` is called
    once per event taken. ``attempt_timeout_s``: one attempt's limit, after which the event is tried again;
    ``close_timeout_s``: how long :meth:`close` waits for acknowledgements. Use it as ``async with
    FeedbackProducer(settings) as feedback:`` (leaving it raises :class:`Undelivered` with what is left).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model: str | None = None,
        versions: VersionSource | None = None,
        topic: str | None = None,
        max_buffered: int = 10_000,
        block: bool = True,
        on_delivery: DeliveryCallback | None = None,
        attempt_timeout_s: float = 15.0,
        close_timeout_s: float = 30.0,
    ) -> None:
        self.model = model or settings.model.name
        self.close_timeout_s = close_timeout_s
        self.max_record_bytes, self.max_buffered = settings.kafka.max_record_bytes, max_buffered
        self._version_of = _lookup(versions)
        self._on_delivery = on_delivery
        self._sender = RecordSender(
            settings.kafka,
            topic or settings.kafka.feedback_topic,
            max_buffered=max_buffered,
            block=block,
            attempt_timeout_s=attempt_timeout_s,
            on_settled=self._settled,
        )
        self._meters: dict[str | None, tuple[Counter, Gauge]] = {}

    @property
    def buffered(self) -> int:
        """Events taken and not yet acknowledged."""
        return self._sender.buffered

    def version(self, model: str | None = None) -> str | None:
        """The adapter version serving ``model`` (default: this producer's) now. Take it when a request starts
        and pass it as ``adapter_version`` with the request's feedback, so a swap in between does not count."""
        return self._version_of(model or self.model) if self._version_of is not None else None

    def record(self, event: FeedbackEvent | None = None, /, **fields: Any) -> Record:
        """``event`` and/or ``fields``, stamped, validated and encoded as the record to send; raises
        :class:`InvalidFeedback` naming the bad field (nothing is sent)."""
        data = {**event.model_dump(exclude_unset=True), **fields} if event is not None else fields
        self._stamp(data)
        try:
            checked = FeedbackEvent.model_validate(data)
            value = _JSON.dump_json(checked, exclude_none=True)
            decode_fields(value, self.max_record_bytes)  # the decoder ingest uses takes these bytes as they are
        except ValidationError as exc:
            FEEDBACK_FAILED.labels(self.model, "invalid").inc()
            raise _invalid(exc) from None
        except PydanticSerializationError as exc:
            FEEDBACK_FAILED.labels(self.model, "invalid").inc()
            raise InvalidFeedback("schema", f"event cannot be written as JSON: {exc}") from None
        except EventRejected as exc:
            FEEDBACK_FAILED.labels(self.model, "invalid").inc()
            raise InvalidFeedback(exc.error_class, str(exc)) from None
        return feedback_record(checked, value)

    def _stamp(self, data: dict[str, Any]) -> None:
        if data.get("model") is None:
            data["model"] = self.model
        if data.get("event_id") is None:
            data["event_id"] = uuid7()
        if data.get("timestamp") is None:
            data["timestamp"] = datetime.now(UTC)
        if data.get("adapter_version") is None and self._version_of is not None and isinstance(data["model"], str):
            data["adapter_version"] = self._version_of(data["model"])

    async def send(self, event: FeedbackEvent | None = None, /, **fields: Any) -> asyncio.Future[Delivered]:
        """Validate and take one event (see :meth:`record`), waiting while the buffer is full; the future is
        resolved when Kafka acknowledges it, or fails with :class:`Undelivered`."""
        return await self.send_record(self.record(event, **fields))

    async def send_and_wait(self, event: FeedbackEvent | None = None, /, **fields: Any) -> Delivered:
        """:meth:`send`, then wait for the acknowledgement."""
        return await (await self.send(event, **fields))

    async def send_record(self, record: Record) -> asyncio.Future[Delivered]:
        """Take a record made by :meth:`record`, waiting while the buffer is full."""
        try:
            return self._taken(record, await self._sender.send(record))
        except BufferFull:
            FEEDBACK_FAILED.labels(record.model, "buffer_full").inc()
            raise

    def _put_record(self, record: Record) -> asyncio.Future[Delivered]:
        """:meth:`send_record` without waiting (:class:`BufferFull`): the thread of :class:`SyncFeedbackProducer`
        waits for room before it calls this."""
        return self._taken(record, self._sender.put(record))

    def _taken(self, record: Record, future: asyncio.Future[Delivered]) -> asyncio.Future[Delivered]:
        self._meters_of(record.model)[1].inc()
        return future

    def _meters_of(self, model: str | None) -> tuple[Counter, Gauge]:
        meters = self._meters.get(model)
        if meters is None:
            meters = self._meters[model] = (FEEDBACK_SENT.labels(model), FEEDBACK_BUFFERED.labels(model))
        return meters

    def _settled(self, record: Record, outcome: Delivered | Undelivered) -> None:
        sent, buffered = self._meters_of(record.model)
        buffered.dec()
        error = outcome if isinstance(outcome, Undelivered) else None
        if error is None:
            sent.inc()
        else:
            FEEDBACK_FAILED.labels(record.model, error.reason).inc()
        if self._on_delivery is not None:
            self._on_delivery(record, error)

    async def start(self) -> None:
        """Connect to Kafka (:class:`~streamengine.errors.ServiceUnavailable` when it cannot be reached)."""
        await self._sender.start()

    async def close(self, timeout_s: float | None = None) -> list[Record]:
        """Take no more events, wait up to ``timeout_s`` (default ``close_timeout_s``) for those buffered to be
        acknowledged, and return the records that were not (write their ``value`` lines to a file to send them
        later with ``streamengine produce``)."""
        return await self._sender.close(self.close_timeout_s if timeout_s is None else timeout_s)

    async def __aenter__(self) -> FeedbackProducer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        left = await self.close()
        if left and exc_type is None:
            raise Undelivered(f"{len(left)} feedback events were not acknowledged by Kafka before close", left)


class SyncFeedbackProducer:
    """:class:`FeedbackProducer` for threaded servers: it runs in an event loop on a thread of its own.

    :meth:`send` validates in the caller's thread (raising there), waits there while ``max_buffered`` events
    are unacknowledged (or raises :class:`BufferFull` with ``block=False``), and returns a
    :class:`concurrent.futures.Future` of the acknowledgement. Other arguments as for
    :class:`FeedbackProducer`; use ``with SyncFeedbackProducer(settings) as feedback:`` or :meth:`close`.
    """

    def __init__(self, settings: Settings, *, max_buffered: int = 10_000, block: bool = True, **options: Any) -> None:
        self.producer = FeedbackProducer(settings, max_buffered=max_buffered, block=False, **options)
        self._room = threading.BoundedSemaphore(max_buffered)
        self._block, self._closed = block, False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamengine-feedback", daemon=True)
        self._thread.start()
        try:
            self._call(self.producer.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def version(self, model: str | None = None) -> str | None:
        """See :meth:`FeedbackProducer.version`."""
        return self.producer.version(model)

    def send(self, event: FeedbackEvent | None = None, /, **fields: Any) -> concurrent.futures.Future[Delivered]:
        """Validate and take one event; the future is resolved when Kafka acknowledges it."""
        record = self.producer.record(event, **fields)
        if self._closed:
            raise Undelivered("the producer is closed: the event was not taken", [record])
        if not self._room.acquire(blocking=self._block):
            FEEDBACK_FAILED.labels(record.model, "buffer_full").inc()
            raise BufferFull(self.producer.max_buffered)
        delivered: concurrent.futures.Future[Delivered] = concurrent.futures.Future()
        delivered.add_done_callback(lambda _: self._room.release())
        try:
            self._loop.call_soon_threadsafe(self._put, record, delivered)
        except RuntimeError:  # closed while this thread waited for room
            delivered.cancel()
            raise Undelivered("the producer is closed: the event was not taken", [record]) from None
        return delivered

    def _put(self, record: Record, delivered: concurrent.futures.Future[Delivered]) -> None:
        try:
            future = self.producer._put_record(record)  # room was taken in the caller's thread
        except Exception as exc:
            delivered.set_exception(exc)
            return
        future.add_done_callback(partial(_copy_outcome, delivered))

    def close(self, timeout_s: float | None = None) -> list[Record]:
        """See :meth:`FeedbackProducer.close`; stops the thread. Closing again returns nothing."""
        if self._closed:
            return []
        self._closed = True
        try:
            return self._call(self.producer.close(timeout_s))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncFeedbackProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        left = self.close()
        if left and exc_type is None:
            raise Undelivered(f"{len(left)} feedback events were not acknowledged by Kafka before close", left)


def _copy_outcome(target: concurrent.futures.Future[Delivered], source: asyncio.Future[Delivered]) -> None:
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
