"""Reading ``adapter.released`` (and ``adapter.canary``) for a subscriber: a group-less consumer on every
partition of the topics.

The end of each partition is taken from fetch responses (the highwater), not ListOffsets, which some
Kafka-protocol brokers (tansu) answer wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
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


async def partitions(consumer: AIOKafkaConsumer, *topics: str) -> set[TopicPartition]:
    """Every partition of ``topics`` that exists (the current assignment when metadata cannot be read)."""
    try:
        cluster = await consumer._client.fetch_all_metadata()
    except KafkaError as exc:
        log.warning("cannot read metadata of topics %s: %s", ", ".join(topics), exc)
        return set(consumer.assignment())
    return {TopicPartition(topic, p) for topic in topics for p in cluster.partitions_for_topic(topic) or set()}


async def caught_up(consumer: AIOKafkaConsumer, parts: set[TopicPartition]) -> bool:
    for tp in parts:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


async def read_to_end(
    consumer: AIOKafkaConsumer, topics: str | list[str], key: bytes | None, timeout_s: float, stopping: Any
) -> list[Any] | None:
    """Assign every partition of ``topics`` (one or several), read them from the beginning to their end and
    return the records keyed ``key`` (or unkeyed; every record when ``key`` is None), oldest first per
    partition. None when none exists."""
    topics = [topics] if isinstance(topics, str) else topics
    parts = await partitions(consumer, *topics)
    if not parts:
        return None
    consumer.assign(list(parts))
    await consumer.seek_to_beginning(*parts)
    seen: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await consumer.getmany(timeout_ms=100)
        for records in batch.values():
            seen.extend(r for r in records if key is None or r.key is None or r.key == key)
        if await caught_up(consumer, parts) or stopping.is_set():
            break
        if time.monotonic() > deadline:
            log.warning("bootstrap of %s not caught up after %.0fs; going on", ", ".join(topics), timeout_s)
            break
    return seen


async def refresh_assignment(consumer: AIOKafkaConsumer, topics: list[str]) -> None:
    """Pick up the topics once they exist, and partitions added later (read from their start)."""
    current = set(consumer.assignment())
    parts = await partitions(consumer, *topics)
    new = parts - current
    if not new:
        return
    positions = {tp: await consumer.position(tp) for tp in current}
    consumer.assign(list(parts | current))
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    await consumer.seek_to_beginning(*new)
    log.info("following %d new partitions of %s", len(new), ", ".join(sorted({tp.topic for tp in new})))


async def sleep_or(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``event`` is set (``asyncio.timeout``: a cancellation is never lost, as
    Python 3.11's ``wait_for`` loses one that comes as the event is set)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def start_until_ready(
    run: Coroutine[Any, Any, None], ready: asyncio.Event, name: str
) -> asyncio.Task[None] | None:
    """``run`` as a background task, once ``ready`` is set; when it ends first, what stopped it is raised (None
    when it ended quietly). A subscriber's (or several's) ``async with``."""
    task = asyncio.create_task(run, name=name)
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        return task
    waiting.cancel()
    await task  # raises what stopped it
    return None
