"""What a serving node tells the engine: its :class:`NodeStatus` records on ``adapter.status`` (key
``<model>/<node_id>``, compacted), sent on every change and every ``serving.status_interval_s`` as a heartbeat,
and a tombstone on its key when it stops cleanly (it leaves the fleet).

Reporting never holds up serving: records wait in a short queue (the oldest dropped when it is full, the
heartbeat carries the state anyway), the producer connects in the background with the ``kafka.*`` security
settings, and a record Kafka does not take is logged, counted and left to the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from aiokafka import AIOKafkaProducer

from streamengine.config.settings import Settings
from streamengine.contract import cloudevents
from streamengine.contract.events import STATUS_TYPE, NodeState, NodeStatus, status_key
from streamengine.core.backoff import Backoff
from streamengine.serving.metrics import STATUS_FAILURES, STATUS_SENT
from streamengine.stream.producer import start_producer

log = logging.getLogger(__name__)

Stage = Literal["production", "canary"]
_QUEUE = 32
_RETRY = Backoff(1.0, 30.0)


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the node runs now (a :class:`NodeStatus` without its heartbeat)."""

    version: str | None = None
    stage: Stage = "production"
    state: NodeState = NodeState.SERVING
    target_version: str | None = None
    reason: str | None = None
    swapped_at: datetime | None = None


class StatusReporter:
    """Publishes one node's status for one model line (:meth:`update` on a change; :meth:`run` sends)."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.kafka = settings.kafka
        self.topic = settings.kafka.status_topic
        self.model, self.node = model, settings.serving.node
        self.interval_s = settings.serving.status_interval_s
        self.canary = settings.serving.canary
        self.view = NodeView()
        self._queue: asyncio.Queue[NodeStatus] = asyncio.Queue(_QUEUE)

    def record(self, view: NodeView | None = None) -> NodeStatus:
        """The record of ``view`` (default: the current one), stamped now."""
        view = view or self.view
        return NodeStatus(
            node_id=self.node,
            model=self.model,
            version=view.version,
            stage=view.stage,
            canary=self.canary,
            state=view.state,
            target_version=view.target_version,
            reason=view.reason[:1000] if view.reason else None,
            swapped_at=view.swapped_at,
            heartbeat_at=datetime.now(UTC),
        )

    def update(self, **changes: object) -> None:
        """Change the node's view (fields of :class:`NodeView`) and queue a record when anything changed."""
        view = replace(self.view, **changes)  # type: ignore[arg-type]
        if view == self.view:
            return
        self.view = view
        if self._queue.full():
            self._queue.get_nowait()  # the newest state matters; the heartbeat repeats it anyway
        self._queue.put_nowait(self.record(view))

    async def run(self, stopping: asyncio.Event) -> None:
        """Send queued records, and the current one every ``interval_s``, until ``stopping`` is set."""
        producer: AIOKafkaProducer | None = None
        failures = 0
        while not self._queue.empty():
            self._queue.get_nowait()  # the changes of the bootstrap: the first record tells where it ended
        self._queue.put_nowait(self.record())
        try:
            while not stopping.is_set():
                try:
                    if producer is None:
                        producer = await start_producer(self.kafka, request_timeout_ms=10_000, linger_ms=0)
                    status = await self._next(stopping)
                    if status is None:
                        break
                    await self._send(producer, status)
                    failures = 0
                except Exception as exc:  # broker away, topic missing...: the heartbeat tries again
                    failures += 1
                    STATUS_FAILURES.labels(self.model).inc()
                    log.warning(
                        "status of node %s not sent to %s: %s: %s", self.node, self.topic, type(exc).__name__, exc
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), _RETRY.delay(failures))
            if producer is not None:
                await self._leave(producer)
        finally:
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _leave(self, producer: AIOKafkaProducer) -> None:
        """A clean stop: a tombstone on this node's key, so the engine forgets it (a node that dies instead
        goes silent after rollout.node_timeout_s)."""
        try:
            key = status_key(self.model, self.node).encode()
            await asyncio.wait_for(producer.send_and_wait(self.topic, value=None, key=key), 3.0)
        except Exception as exc:
            log.warning(
                "node %s could not say it leaves (%s: %s); it will show as silent", self.node, type(exc).__name__, exc
            )

    async def _next(self, stopping: asyncio.Event) -> NodeStatus | None:
        """The next queued record, else after ``interval_s`` a heartbeat; None once ``stopping`` is set."""
        get = asyncio.ensure_future(self._queue.get())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({get, stop}, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        return None if stopping.is_set() else self.record()

    async def _send(self, producer: AIOKafkaProducer, status: NodeStatus) -> None:
        headers = cloudevents.headers(str(uuid.uuid4()), STATUS_TYPE, status.heartbeat_at)
        await producer.send_and_wait(
            self.topic,
            value=status.model_dump_json().encode(),
            key=status_key(self.model, self.node).encode(),
            headers=cloudevents.as_kafka(headers),
        )
        STATUS_SENT.labels(self.model).inc()
