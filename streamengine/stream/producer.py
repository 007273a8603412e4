"""One aiokafka producer per process, shared by the DLQ and the outbox relay."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamengine.config.settings import KafkaSettings
from streamengine.errors import ServiceUnavailable


async def start_producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    """A started producer waiting for all in-sync replicas (no idempotence: tansu lacks it)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=max(kafka.max_record_bytes * 2, 1_048_576),
        request_timeout_ms=15_000,
    )
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        await producer.stop()
        raise ServiceUnavailable("Kafka", kafka.bootstrap_servers, str(exc) or type(exc).__name__) from None
    return producer
