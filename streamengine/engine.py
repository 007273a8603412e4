"""`streamengine run`: ingest, scheduler, outbox relay and the admin API in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer

from streamengine.config import Settings
from streamengine.jobs.scheduler import run_scheduler
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.app import build_app
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.outbox import run_relay
from streamengine.stream.producer import start_producer
from streamengine.stream.topics import ensure_topics

log = logging.getLogger(__name__)


@dataclass
class EngineContext:
    """What the admin API and the background loops share."""

    settings: Settings
    db: Database
    store: ObjectStore
    producer: AIOKafkaProducer
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def connect(settings: Settings) -> EngineContext:
    """Reach every dependency (one clear error naming the first that fails), migrate, create topics."""
    db = await Database.connect(settings.database)
    try:
        await ensure_topics(settings.kafka)
        store = ObjectStore.from_settings(settings.storage)
        await store.aensure_bucket()
        producer = await start_producer(settings.kafka)
    except BaseException:
        await db.close()
        raise
    return EngineContext(settings, db, store, producer)


async def run_engine(settings: Settings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or the task is cancelled)."""
    from streamengine.api import serve_api

    ctx = await connect(settings)
    if stop is not None:
        ctx.stop = stop
    datadir = Path(settings.worker.work_dir).parent / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    app = build_app(settings, IngestPipeline(settings, ctx.db, ctx.producer), datadir)
    tasks: list[asyncio.Task[None]] = []
    try:
        await app.start()
        tasks = [
            asyncio.create_task(run_relay(ctx.db, ctx.producer, ctx.stop), name="outbox-relay"),
            asyncio.create_task(run_scheduler(settings, ctx.db, ctx.stop), name="scheduler"),
            asyncio.create_task(serve_api(ctx), name="admin-api"),
        ]
        log.info(
            "streamengine running: model %s, topic %s, admin API %s",
            settings.model.name,
            settings.kafka.feedback_topic,
            settings.api.base_url(),
        )
        if ready is not None:
            ready.set()
        await ctx.stop.wait()
    finally:
        ctx.stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await app.stop()
        await ctx.producer.stop()
        await ctx.db.close()
