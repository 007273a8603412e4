"""One aiokafka producer per process, shared by the DLQ and the outbox relay."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from streamengine.config.settings import KafkaSettings
from streamengine.stream import security


async def start_producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    """A started producer waiting for all in-sync replicas (no idempotence: tansu lacks it)."""
    producer = AIOKafkaProducer(
        **security.client_options(kafka),
        acks="all",
        linger_ms=5,
        max_request_size=max(kafka.max_record_bytes * 2, 1_048_576),
        request_timeout_ms=15_000,
    )
    await security.start(producer, kafka)
    return producer
