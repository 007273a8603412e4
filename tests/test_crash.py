"""SIGKILL `streamengine run` mid-stream, restart it, and count: no sample lost or doubled."""

from __future__ import annotations

import asyncio
import random

import pytest

from streamengine.store.db import Database
from streamengine.stream.topics import ensure_topics
from tests import process_tools
from tests.engine_tools import health_ok
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("consumer", ["aiokafka", "faust"])
async def test_sigkill_run_loses_and_duplicates_nothing(make_settings, tmp_path, consumer) -> None:  # type: ignore[no-untyped-def]
    total, window, kills = 4000, 100, 3
    settings = make_settings(
        window={"max_samples": window}, kafka={"batch_max_records": 200, "partitions": 3, "consumer": consumer}
    )
    k = settings.kafka
    await ensure_topics(k)
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    log = tmp_path / "run.log"
    rng = random.Random(42)
    db = await Database.connect(settings.database)
    engine = process_tools.start(["run"], config, log)
    try:

        async def stream() -> None:  # a steady stream, with a share of redelivered duplicates
            for start in range(0, total, 50):
                chunk = [feedback(i) for i in range(start, start + 50)]
                chunk += [feedback(rng.randrange(start + 1)) for _ in range(3)]
                await produce(k.bootstrap_servers, k.feedback_topic, chunk, key=f"k{start}".encode())
                await asyncio.sleep(0.5)

        await wait_for(lambda: health_ok(settings.api.base_url()), timeout_s=60)
        producer = asyncio.create_task(stream())
        for _ in range(kills):
            stored = await db.fetchval("SELECT count(*) FROM samples")
            await wait_for(lambda s=stored: _more_than(db, s), timeout_s=60)  # it is ingesting right now
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            process_tools.kill(engine)
            engine = process_tools.start(["run"], config, log)
        assert not producer.done(), "the stream ended before the last kill: make it longer"
        await producer

        await wait_for(lambda: _exactly(db, total), timeout_s=120)
        await asyncio.sleep(2)  # anything redelivered after the last restart is in by now
        samples = await db.fetchval("SELECT count(*) FROM samples")
        distinct = await db.fetchval("SELECT count(DISTINCT event_id) FROM samples")
        stored_in_windows = await db.fetchval("SELECT sum(stored) FROM windows")
        closed = await db.fetch("SELECT id, samples FROM windows WHERE state = 'closed' ORDER BY id")
        jobs = await db.fetchval("SELECT count(*) FROM jobs")
    finally:
        process_tools.stop(engine)
        await db.close()
    assert samples == distinct == total  # nothing lost, nothing twice
    assert stored_in_windows == total  # no sample counted twice in window accounting
    assert len(closed) == total // window and all(w["samples"] == window for w in closed)
    assert jobs == len(closed)  # each window closed exactly once
    assert log.read_text().count("streamengine running") == kills + 1


async def _more_than(db: Database, count: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) > count


async def _exactly(db: Database, count: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) >= count
