"""What the engine's admin API and background loops share: the connections and the running tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from streamengine.config.lines import Lines
from streamengine.config.settings import Settings
from streamengine.core.windows import Schedule
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.app import IngestConsumer

log = logging.getLogger(__name__)


@dataclass
class EngineContext:
    """What the admin API and the background loops share."""

    settings: Settings
    db: Database
    store: ObjectStore
    producer: AIOKafkaProducer
    reads: Database
    """The admin API's read endpoints' own small pool (database.api_pool_size): a flood of reads waits there, not
    in ``db``, the pool of ingest and the background loops."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    schedule: Schedule | None = None
    app: IngestConsumer | None = None
    """The ingest consumer; None until it started."""
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    collectors: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    """Run before each /metrics scrape so gauges read from PostgreSQL and Kafka are current."""
    lines: Lines = field(init=False)
    """The model lines of ``settings`` (each name's effective settings remembered)."""

    def __post_init__(self) -> None:
        self.lines = Lines(self.settings)

    async def collect(self, timeout_s: float = 2.0) -> None:
        for collector in self.collectors:
            try:
                await asyncio.wait_for(collector(), timeout_s)
            except Exception as exc:
                log.debug("metrics collector failed: %s: %s", type(exc).__name__, exc)
