"""Creating the contract's topics when they are missing."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamengine.config.settings import KafkaSettings
from streamengine.contract.topics import topic_specs
from streamengine.stream import security

log = logging.getLogger(__name__)


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create the contract's topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(**security.client_options(kafka), request_timeout_ms=10_000)
    await security.start(admin, kafka)
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
