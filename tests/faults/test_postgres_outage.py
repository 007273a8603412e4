"""PostgreSQL stops for 10 s mid-stream: ingest waits and retries, /health says so, nothing is lost."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.local.embedded import Postgres, create_database
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def private_postgres():  # type: ignore[no-untyped-def]
    """A PostgreSQL server of this test alone, so stopping it disturbs nothing else."""
    folder = Path(tempfile.mkdtemp(prefix="streamengine-outage-pg-"))
    folder.chmod(0o755)
    server = Postgres(folder / "data", folder / "logs").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _health(url: str) -> dict:  # type: ignore[type-arg]
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/health")
        return {"code": response.status_code, **response.json()}


async def test_postgres_outage_is_survived(make_settings, private_postgres) -> None:  # type: ignore[no-untyped-def]
    dsn = create_database(private_postgres.dsn, "outage")
    settings = make_settings(database={"url": dsn}, window={"max_samples": 100}, kafka={"batch_max_records": 100})
    k = settings.kafka
    stop, ready = asyncio.Event(), asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 60)
    total = 2000
    try:
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(total // 2)])
        db = await Database.connect(settings.database, migrate=False)
        await wait_for(lambda: _count_at_least(db, 1), timeout_s=60)
        await db.close()

        await asyncio.to_thread(private_postgres.stop)
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(total // 2, total)])
        down = await wait_for(lambda: _degraded(settings.api.base_url()), timeout_s=30)
        assert down["checks"]["postgres"]["ok"] is False and down["checks"]["kafka"]["ok"] is True
        await asyncio.sleep(10)
        await asyncio.to_thread(private_postgres.start)

        db = await Database.connect(settings.database, migrate=False)
        await wait_for(lambda: _count_at_least(db, total), timeout_s=120)
        healthy = await wait_for(lambda: _healthy(settings.api.base_url()), timeout_s=30)
        assert healthy["status"] == "ok"
        stored = await db.fetchval("SELECT count(*) FROM samples")
        in_windows = await db.fetchval("SELECT sum(stored) FROM windows")
        jobs = await db.fetchval("SELECT count(*) FROM jobs")
        await db.close()
    finally:
        stop.set()
        await asyncio.gather(engine, return_exceptions=True)
    assert stored == in_windows == total
    assert jobs == total // 100


async def test_worker_waits_out_a_postgres_outage(make_settings, private_postgres) -> None:  # type: ignore[no-untyped-def]
    """Claims fail while PostgreSQL is down: the worker backs off and keeps polling, never exits."""
    settings = make_settings(
        database={"url": create_database(private_postgres.dsn, "worker_outage")}, worker={"poll_s": 0.2}
    )
    db = await Database.connect(settings.database)
    worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="patient")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))

    async def outages(at_least: int) -> bool:
        return worker.outages >= at_least

    async def recovered() -> bool:
        return worker.outages == 0

    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_postgres.stop)
        await wait_for(lambda: outages(3), timeout_s=60)  # three claims in a row failed
        assert not running.done()
        await asyncio.to_thread(private_postgres.start)
        await wait_for(recovered, timeout_s=90)  # a claim answered again (the queue is empty)
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)  # raises what ended the worker, if anything did
        await db.close()


async def _count_at_least(db: Database, n: int) -> bool:
    try:
        return int(await db.fetchval("SELECT count(*) FROM samples")) >= n
    except Exception:
        return False


async def _degraded(url: str) -> dict | None:  # type: ignore[type-arg]
    body = await _health(url)
    return body if body["code"] == 503 else None


async def _healthy(url: str) -> dict | None:  # type: ignore[type-arg]
    body = await _health(url)
    return body if body["code"] == 200 else None
