"""Reading ``adapter.released`` for a subscriber: a group-less consumer on every partition of the topic.

The end of each partition is taken from fetch responses (the highwater), not ListOffsets, which some
Kafka-protocol brokers (tansu) answer wrongly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streamengine.config.settings import KafkaSettings
from streamengine.stream import security

log = logging.getLogger(__name__)


async def open_consumer(kafka: KafkaSettings, client_id: str, fetch_wait_ms: int) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        **security.client_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=client_id,
        fetch_max_wait_ms=fetch_wait_ms,
    )
    await security.start(consumer, kafka)
    return consumer


async def partitions(consumer: AIOKafkaConsumer, topic: str) -> set[TopicPartition]:
    try:
        cluster = await consumer._client.fetch_all_metadata()
    except KafkaError as exc:
        log.warning("cannot read metadata of topic %s: %s", topic, exc)
        return set(consumer.assignment())
    ids = cluster.partitions_for_topic(topic) or set()
    return {TopicPartition(topic, p) for p in ids}


async def caught_up(consumer: AIOKafkaConsumer, parts: set[TopicPartition]) -> bool:
    for tp in parts:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


async def read_to_end(
    consumer: AIOKafkaConsumer, topic: str, key: bytes, timeout_s: float, stopping: Any
) -> list[Any] | None:
    """Assign every partition of ``topic``, read it from the beginning to its end and return the
    records keyed ``key`` (or unkeyed), oldest first per partition. None when the topic does not exist."""
    parts = await partitions(consumer, topic)
    if not parts:
        return None
    consumer.assign(list(parts))
    await consumer.seek_to_beginning(*parts)
    seen: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await consumer.getmany(timeout_ms=100)
        for records in batch.values():
            seen.extend(r for r in records if r.key is None or r.key == key)
        if await caught_up(consumer, parts) or stopping.is_set():
            break
        if time.monotonic() > deadline:
            log.warning("bootstrap of %s not caught up after %.0fs; going on", topic, timeout_s)
            break
    return seen


async def refresh_assignment(consumer: AIOKafkaConsumer, topic: str) -> None:
    """Pick up the topic once it exists, and partitions added later (read from their start)."""
    current = set(consumer.assignment())
    parts = await partitions(consumer, topic)
    new = parts - current
    if not new:
        return
    positions = {tp: await consumer.position(tp) for tp in current}
    consumer.assign(list(parts | current))
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    await consumer.seek_to_beginning(*new)
    log.info("following %d new partitions of %s", len(new), topic)
