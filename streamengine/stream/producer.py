"""One aiokafka producer per process, shared by the DLQ and the outbox relay."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer

from streamengine.config.settings import KafkaSettings
from streamengine.stream import security


def request_bytes(kafka: KafkaSettings) -> int:
    """The largest request a producer sends: two of the largest records ingest takes, at least 1 MiB."""
    return max(kafka.max_record_bytes * 2, 1_048_576)


async def start_producer(kafka: KafkaSettings, **options: Any) -> AIOKafkaProducer:
    """A started producer waiting for all in-sync replicas (no idempotence: tansu lacks it); ``options``
    replace the defaults below (the feedback producer sets its own ``request_timeout_ms``)."""
    defaults: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": request_bytes(kafka),
        "request_timeout_ms": 15_000,
    }
    producer = AIOKafkaProducer(**security.client_options(kafka), **(defaults | options))
    await security.start(producer, kafka)
    return producer
