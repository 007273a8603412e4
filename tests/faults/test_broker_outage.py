"""The broker stops mid-stream and comes back (durable storage): the engine recovers by itself."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from streamengine.engine import run_engine
from streamengine.local.embedded import Tansu
from streamengine.store.db import Database
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _count(db: Database, n: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) >= n


async def _status(url: str, code: int) -> bool:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            return (await client.get(url + "/health")).status_code == code
        except httpx.TransportError:
            return False


async def test_broker_restart_is_survived(make_settings, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = Tansu(tmp_path / "logs", s3=services.s3, bucket="tansu-outage").start()
    settings = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap, "batch_max_records": 100}, window={"max_samples": 100}
    )
    k = settings.kafka
    stop, ready = asyncio.Event(), asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    db = None
    try:
        await asyncio.wait_for(ready.wait(), 60)
        db = await Database.connect(settings.database, migrate=False)
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(1000)])
        await wait_for(lambda: _count(db, 1000), timeout_s=60)

        await asyncio.to_thread(broker.stop)
        await wait_for(lambda: _status(settings.api.base_url(), 503), timeout_s=60)
        await asyncio.sleep(5)
        await asyncio.to_thread(broker.start)

        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(1000, 2000)])
        await wait_for(lambda: _count(db, 2000), timeout_s=120)
        await wait_for(lambda: _status(settings.api.base_url(), 200), timeout_s=60)
        stored = await db.fetchval("SELECT count(*) FROM samples")
        in_windows = await db.fetchval("SELECT sum(stored) FROM windows")
        jobs = await db.fetchval("SELECT count(*) FROM jobs")
    finally:
        stop.set()
        await asyncio.gather(engine, return_exceptions=True)
        if db is not None:
            await db.close()
        broker.stop()
    assert stored == in_windows == 2000
    assert jobs == 20
