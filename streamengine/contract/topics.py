"""The contract's topics: names, keys, partitioning and retention (the source of topics/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamengine.config.settings import KafkaSettings

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
    """The five topics with their default names, partitioning and retention."""
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
        TopicSpec(
            kafka.canary_topic,
            "Output: a version on trial on the serving nodes it names, and the end of each trial; read only by "
            "nodes that take part in canaries; latest record per key wins.",
            "model name",
            "schemas/adapter-canary.v1.json",
            1,
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            kafka.status_topic,
            "Input: what each serving node runs for each model line (state, version, heartbeat); latest record "
            "per key wins.",
            "<model>/<node_id>",
            "schemas/adapter-status.v1.json",
            1,
            {"cleanup.policy": "compact"},
        ),
    ]
