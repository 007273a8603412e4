"""The faust-streaming ingest consumer (``kafka.consumer: faust``).

One agent, concurrency 1, ``noack_take``: a batch's events are acknowledged only after the pipeline
returns (DLQ acknowledged, samples committed), so the committed offset never passes an event whose side
effects are not durable (faust-streaming issue #606 is avoided by never running concurrency > 1). The
pipeline gets a batch in runs of at most ``kafka.batch_max_bytes``; faust's own buffer ahead of the agent is
counted in records (``stream_buffer_maxsize``), not bytes: with large records, prefer the default consumer.
faust's per-event machinery costs about 150 us of CPU per event (``bench/ingest.py``), so the default
consumer is the plain aiokafka one of :mod:`streamengine.stream.app`; choose faust to run ingest as a
faust app among your own agents. :class:`FaustIngest` gives the faust app the engine's
:class:`~streamengine.stream.app.IngestConsumer` interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka import TopicPartition
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.consumer import Consumer
from faust.types.auth import CredentialsT as Credentials

from streamengine.config.settings import KafkaSettings, Settings
from streamengine.stream import security
from streamengine.stream.ingest import IngestPipeline, RawRecord, record_bytes


def _headers(message: Any) -> list[tuple[str, bytes]]:
    raw = message.headers or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), bytes(v) if v is not None else b"") for k, v in items]


def _chunks(records: list[RawRecord], limit: int) -> Iterator[list[RawRecord]]:
    """``records`` in order, in runs of at most ``limit`` bytes (a longer record alone)."""
    chunk: list[RawRecord] = []
    size = 0
    for record in records:
        took = record_bytes(record)
        if chunk and size + took > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += took
    if chunk:
        yield chunk


class FaustIngest:
    """The faust app as an :class:`~streamengine.stream.app.IngestConsumer`."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    @property
    def crashed(self) -> bool:
        return bool(self.app.crashed)

    @property
    def should_stop(self) -> bool:
        return bool(self.app.should_stop)

    @property
    def crash_reason(self) -> BaseException | None:
        return self.app.crash_reason

    async def start(self) -> None:
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self.app.consumer.assignment()}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.app.consumer.highwater(tp)

    def committed(self, tp: TopicPartition) -> int | None:
        # faust keeps what it committed only in this attribute of its Consumer (None before the first commit).
        consumer = cast(Consumer, self.app.consumer)
        return consumer._committed_offset.get(tp)

    async def position(self, tp: TopicPartition) -> int | None:
        return await self.app.consumer.position(tp)


def broker_credentials(kafka: KafkaSettings) -> Credentials | None:
    """The ``kafka.*`` security settings as faust takes them (None: PLAINTEXT)."""
    context = security.ssl_context(kafka)
    if security.uses_sasl(kafka):
        assert kafka.sasl_password is not None  # KafkaSettings refuses SASL without user and password
        password = kafka.sasl_password.get_secret_value()
        return SASLCredentials(
            username=kafka.sasl_username, password=password, ssl_context=context, mechanism=kafka.sasl_mechanism
        )
    return SSLCredentials(context) if context is not None else None


def build_faust_app(settings: Settings, pipeline: IngestPipeline, datadir: Path) -> FaustIngest:
    kafka = settings.kafka
    app = faust.App(
        kafka.group_id,
        broker=f"kafka://{kafka.bootstrap_servers}",
        broker_credentials=broker_credentials(kafka),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=min(3.0, kafka.session_timeout_s / 3),
        broker_rebalance_timeout=kafka.rebalance_timeout_s,
        broker_commit_interval=kafka.commit_interval_s,
        stream_buffer_maxsize=max(kafka.batch_max_records * 2, 4096),
        consumer_max_fetch_size=max(kafka.max_record_bytes, min(4 * 1024 * 1024, kafka.batch_max_bytes)),
    )
    topic = app.topic(kafka.feedback_topic, value_type=bytes, key_type=bytes, value_serializer="raw")

    @app.agent(topic, concurrency=1)
    async def ingest(stream: Any) -> None:  # a faust Stream (noack_take is not on StreamT)
        async for events in stream.noack_take(kafka.batch_max_records, within=kafka.batch_max_wait_s):
            records = [
                RawRecord(
                    topic=e.message.topic,
                    partition=e.message.partition,
                    offset=e.message.offset,
                    key=e.message.key,
                    value=e.message.value,
                    headers=_headers(e.message),
                    timestamp=int(e.message.timestamp * 1000) if e.message.timestamp else None,
                )
                for e in events
            ]
            for chunk in _chunks(records, kafka.batch_max_bytes):
                await pipeline.process(chunk)
            for event in events:
                await stream.ack(event)

    return FaustIngest(app)
