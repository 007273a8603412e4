"""`streamengine run`: ingest, scheduler, outbox relay, fleet status, consumer-lag sampling and the admin API in one
process.

Replicas share the work through the engines underneath: ingest through the Kafka consumer group
(``kafka.group_id``: each partition is consumed by one replica), the tick and the outbox relay through
PostgreSQL (row locks and an advisory lock: any replica may run them, one at a time wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from streamengine import metrics
from streamengine.api.app import bind_api_socket, serve_api
from streamengine.api.context import EngineContext
from streamengine.config.keys import release_signer
from streamengine.config.settings import DatabaseSettings, Settings
from streamengine.errors import StreamEngineError
from streamengine.jobs.rollout import run_judge
from streamengine.jobs.scheduler import refresh_gauges, run_scheduler, schedule_of
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream import fleet
from streamengine.stream.app import IngestConsumer, build_app
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.outbox import run_relay
from streamengine.stream.producer import start_producer
from streamengine.stream.redaction import build_redactor
from streamengine.stream.topics import ensure_topics

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""How long the background loops and the admin API get to end by themselves at shutdown."""
LAG_INTERVAL_S = 5.0
"""How often consumer lag is sampled between scrapes (every scrape of /metrics samples it too)."""


class LagObserver:
    """Consumer lag of this replica's assigned partitions, read from the ingest consumer.

    ``highwater`` comes from the fetch responses (right on Apache Kafka and on tansu, whose
    ListOffsets(LATEST) is not); the committed offset is the one this replica committed after the
    batch's samples were durable in PostgreSQL. Before its first commit the fetch position stands in
    for it. Partitions that moved to another replica stop being reported here.
    """

    def __init__(self, app: IngestConsumer, topic: str) -> None:
        self.app = app
        self.topic = topic
        self.reported: set[int] = set()

    async def observe(self) -> dict[int, int]:
        app = self.app
        lags: dict[int, int] = {}
        for tp in app.assignment():
            if tp.topic != self.topic:
                continue
            highwater = app.highwater(tp)
            if highwater is None:  # nothing fetched yet
                continue
            done = app.committed(tp)
            if done is None:
                done = await app.position(tp)
            lags[tp.partition] = max(0, int(highwater) - int(done or 0))
        for partition in self.reported - set(lags):
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.topic, str(partition))
        for partition, lag in lags.items():
            metrics.CONSUMER_LAG.labels(self.topic, str(partition)).set(lag)
        self.reported = set(lags)
        return lags


async def connect(settings: Settings) -> EngineContext:
    """Reach every dependency (one clear error naming the first that fails), migrate, create topics."""
    schedule = schedule_of(settings)  # a bad cron or time zone fails before anything starts
    build_redactor(settings.privacy)  # so does a privacy.function that cannot be imported (cached for ingest)
    release_signer(settings)  # and a signing key file that cannot be read (deploy and rollback sign)
    db = await Database.connect(settings.database)
    reads: Database | None = None
    try:
        reads = await Database.connect(_api_pool(settings.database), migrate=False)
        await ensure_topics(settings.kafka)
        store = ObjectStore.from_settings(settings.storage)
        await store.aensure_bucket()
        producer = await start_producer(settings.kafka)
    except BaseException:
        if reads is not None:
            await reads.close()
        await db.close()
        raise
    return EngineContext(settings, db, store, producer, reads, schedule=schedule)


def _api_pool(database: DatabaseSettings) -> DatabaseSettings:
    """The admin API's read pool: database.api_pool_size connections at most."""
    size = database.api_pool_size
    return database.model_copy(update={"pool_min": min(database.pool_min, size), "pool_max": size})


async def _sample_lag(observer: LagObserver, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await observer.observe()
        except Exception as exc:  # not started yet, rebalancing: try again later
            log.debug("consumer lag not sampled: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=LAG_INTERVAL_S)


async def run_engine(settings: Settings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or the task is cancelled)."""
    sock = bind_api_socket(settings)  # a taken port fails before anything starts
    try:
        ctx = await connect(settings)
    except BaseException:
        sock.close()
        raise
    if stop is not None:
        ctx.stop = stop
    datadir = Path(settings.worker.work_dir).parent / "faust"
    app = build_app(settings, IngestPipeline(settings, ctx.db, ctx.producer), datadir)
    observer = LagObserver(app, settings.kafka.feedback_topic)
    assert ctx.schedule is not None
    schedule = ctx.schedule
    ctx.collectors += [lambda: refresh_gauges(ctx.reads, settings.model.name, schedule), observer.observe]
    ctx.collectors.append(lambda: fleet.refresh_gauges(ctx.reads, settings.rollout.node_timeout_s))
    try:
        await app.start()
        ctx.app = app
        ctx.tasks = {
            "outbox-relay": asyncio.create_task(run_relay(ctx.db, ctx.producer, ctx.stop), name="outbox-relay"),
            "scheduler": asyncio.create_task(run_scheduler(settings, ctx.db, ctx.stop), name="scheduler"),
            "canary-judge": asyncio.create_task(run_judge(settings, ctx.db, ctx.stop), name="canary-judge"),
            "consumer-lag": asyncio.create_task(_sample_lag(observer, ctx.stop), name="consumer-lag"),
            "fleet": asyncio.create_task(fleet.run_status_consumer(settings, ctx.db, ctx.stop), name="fleet"),
            "admin-api": asyncio.create_task(serve_api(ctx, sock), name="admin-api"),
        }
        log.info(
            "streamengine running: model %s, topic %s, admin API %s",
            settings.model.name,
            settings.kafka.feedback_topic,
            settings.api.base_url(),
        )
        if ready is not None:
            ready.set()
        await _until_stopped(ctx)
    finally:
        ctx.stop.set()  # every loop and the admin API end on their own; what does not is cancelled
        if ctx.tasks:
            _, late = await asyncio.wait(ctx.tasks.values(), timeout=STOP_TIMEOUT_S)
            for task in late:
                task.cancel()
        for task in ctx.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await app.stop()
        await ctx.producer.stop()
        await ctx.reads.close()
        await ctx.db.close()
        sock.close()


async def _until_stopped(ctx: EngineContext) -> None:
    """Wait for ``stop``; a background loop that ends on its own is a failure of the whole process."""
    stopped = asyncio.create_task(ctx.stop.wait())
    try:
        await asyncio.wait({stopped, *ctx.tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if ctx.stop.is_set():
        return
    for name, task in ctx.tasks.items():
        if task.done():
            exc = None if task.cancelled() else task.exception()
            detail = f"{type(exc).__name__}: {exc}" if exc else "ended"
            raise StreamEngineError(f"the engine's {name} loop stopped ({detail}); shutting down")
