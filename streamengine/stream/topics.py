"""Topic definitions (the contract's three topics) and creating them when missing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streamengine.config import KafkaSettings
from streamengine.errors import ServiceUnavailable

log = logging.getLogger(__name__)

WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    purpose: str
    key: str
    value_schema: str | None
    partitions: int
    config: dict[str, str] = field(default_factory=dict)

    def as_document(self) -> dict[str, object]:
        return {
            "name": self.name,
            "purpose": self.purpose,
            "key": self.key,
            "value_schema": self.value_schema,
            "partitions": self.partitions,
            "config": dict(self.config),
        }


def topic_specs(kafka: KafkaSettings) -> list[TopicSpec]:
    """The three topics with their default names, partitioning and retention."""
    return [
        TopicSpec(
            kafka.feedback_topic,
            "Input: user feedback from serving nodes.",
            "user or session id",
            "schemas/feedback-event.v1.json",
            kafka.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(WEEK_MS)},
        ),
        TopicSpec(
            kafka.dlq_topic,
            "Every rejected feedback record, original bytes untouched; headers error.class, error.message,"
            " source.topic, source.partition, source.offset.",
            "the original record's key",
            None,
            kafka.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(4 * WEEK_MS)},
        ),
        TopicSpec(
            kafka.released_topic,
            "Output: the adapter version each model's serving nodes must run; latest record per key wins.",
            "model name",
            "schemas/adapter-released.v1.json",
            1,
            {"cleanup.policy": "compact"},
        ),
    ]


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create the contract's topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=10_000)
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        raise ServiceUnavailable("Kafka", kafka.bootstrap_servers, str(exc) or type(exc).__name__) from None
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        for spec in topic_specs(kafka):
            if spec.name in existing:
                continue
            topic = NewTopic(spec.name, spec.partitions, kafka.replication_factor, topic_configs=spec.config)
            try:
                await admin.create_topics([topic])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    for name in created:
        log.info("created topic %s", name)
    return created
