"""The ingest consumer's checkpoint: which offsets may be committed, and committing them.

An offset is committed only after the side effects of the records before it are durable (DLQ records
acknowledged, samples committed in PostgreSQL): the consumer loop calls :meth:`Checkpoint.stored` after
a batch is stored and :meth:`Checkpoint.commit` when :meth:`Checkpoint.due` (every
``kafka.commit_interval_s``), and on stop. ``lock`` is held around a batch's store, its ``stored`` and
any commit, so a rebalance (the checkpoint is the consumer's rebalance listener) waits for the batch in
flight to be stored and committed before its partitions are given up. A commit that still loses the race
(the partition moved on) is harmless: inserts are idempotent on the event id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from operator import attrgetter

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from streamengine.stream.ingest import Record

log = logging.getLogger(__name__)
_TOPIC_PARTITION, _OFFSET = attrgetter("topic", "partition"), attrgetter("offset")


class Checkpoint(ConsumerRebalanceListener):
    """Offsets stored but not yet committed, and the offsets this replica committed, for one consumer."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_s: float) -> None:
        self.consumer = consumer
        self.interval_s = interval_s
        self.lock = asyncio.Lock()
        self.committed: dict[TopicPartition, int] = {}
        """Next offset to read per assigned partition, as last committed by this replica."""
        self._stored: dict[TopicPartition, int] = {}
        self._last_commit = 0.0

    def stored(self, records: Sequence[Record]) -> None:
        """The records' side effects are durable: commit the offsets after them with the next commit."""
        last = dict(zip(map(_TOPIC_PARTITION, records), map(_OFFSET, records), strict=True))  # in C; records
        for (topic, partition), offset in last.items():  # are in offset order per partition: the last one wins
            self._stored[TopicPartition(topic, partition)] = offset + 1

    def due(self) -> bool:
        """Something is stored and ``interval_s`` has passed since the last commit."""
        return bool(self._stored) and time.monotonic() - self._last_commit >= self.interval_s

    async def commit(self) -> None:
        """Commit the offsets stored so far for the partitions still assigned (call it under ``lock``)."""
        assigned = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in self._stored.items() if tp in assigned}
        self._stored.clear()  # partitions no longer assigned: their new owner reads from the last commit
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced meanwhile: the new owner reads from the last commit; duplicates are dropped.
            log.warning("offset commit skipped after a rebalance: %s", exc)
            return
        except KafkaError as exc:
            log.warning("offset commit failed (%s); retried with the next batch", exc)
            self._stored.update(offsets)
            return
        self._last_commit = time.monotonic()
        self.committed.update(offsets)

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Partitions are given up only once the batch in flight is stored and its offsets committed."""
        async with self.lock:
            await self.commit()
            for tp in revoked:
                self.committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        log.info("ingest assigned partitions %s", sorted(tp.partition for tp in assigned))
        await start_uncommitted_at_zero(self.consumer, assigned)


async def start_uncommitted_at_zero(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
    """Partitions the group never committed are read from offset 0, not from the broker's "earliest" answer.

    tansu (the development broker) answered "earliest" with offset 1 for a partition two producers had
    written at once, so its first record was never read (tests/test_ingest.py, about 1 run in 5). Where
    offset 0 is gone (retention), the fetch is out of range and the consumer resets to the earliest offset
    (``auto_offset_reset``), as it would have anyway."""
    committed = await asyncio.gather(*(consumer.committed(tp) for tp in partitions))
    for tp, offset in zip(partitions, committed, strict=True):
        if offset is None:
            consumer.seek(tp, 0)
