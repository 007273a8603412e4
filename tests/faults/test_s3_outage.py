"""The S3 server stops for 30 s while a real worker releases adapters and the engine ingests.

A private SeaweedFS server (durable data folder, so it comes back with what it held) is stopped while the
worker (`streamengine worker`, training the tiny model for real) is on its second job. During the outage
GET /health answers 503 naming S3, ingest goes on (a third window closes), nothing is released. With S3
back the engine reports ready again by itself and the worker releases every window's job exactly once,
each published version complete and verified in S3.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamengine.contract.events import AdapterReleased
from streamengine.engine import run_engine
from streamengine.local.embedded import SeaweedS3
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests import process_tools
from tests.kafka_tools import feedback, produce, read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW, OUTAGE_S = 16, 30.0
TRAINING = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 64}


@pytest.fixture
def private_s3() -> Iterator[SeaweedS3]:
    """An S3 server of this test alone (stopping it disturbs no other test), data kept across restarts."""
    folder = Path(tempfile.mkdtemp(prefix="streamengine-outage-s3-"))
    server = SeaweedS3(folder / "data", folder / "logs").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _health(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=15) as client:
        response = await client.get(url + "/health")
        return {"code": response.status_code, **response.json()}


async def _health_is(url: str, code: int) -> dict[str, Any] | None:
    body = await _health(url)
    return body if body["code"] == code else None


async def test_s3_outage_delays_releases_and_loses_nothing(make_settings, private_s3, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(
        storage={"endpoint": private_s3.endpoint, "access_key": private_s3.access_key,
                 "secret_key": private_s3.secret_key},
        model={"base": str(tiny_model)},
        window={"max_samples": WINDOW, "schedule": "0 0 1 1 *"},
        training=TRAINING,
        learning={"gate": False},  # every window's candidate is released: the counts are about S3 alone
        kafka={"batch_max_records": 100},
        # progress reaches the database every second; a process per job, so that job 2 lasts long enough to be
        # caught mid-job (a warm trainer ends its two steps within one heartbeat)
        worker={"poll_s": 0.5, "heartbeat_s": 1.0, "warm": False},
    )  # fmt: skip
    k, url = settings.kafka, settings.api.base_url()
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    worker_log = tmp_path / "worker.log"
    stop, ready = asyncio.Event(), asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 60)
    db = await Database.connect(settings.database, migrate=False)
    worker = process_tools.start(["worker"], config, worker_log)
    try:
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(2 * WINDOW)])
        await wait_for(lambda: _job_state(db, 1, "released"), timeout_s=180)
        await wait_for(lambda: _training(db, 2), timeout_s=120)  # the worker is on job 2: its upload will fail

        await asyncio.to_thread(private_s3.stop)
        down_at = time.monotonic()
        released = await db.fetchval("SELECT count(*) FROM adapters")  # v1.0 (v1.1 too, had job 2 been quick)
        down = await wait_for(lambda: _health_is(url, 503), timeout_s=30)
        assert down["checks"]["s3"]["ok"] is False and "S3" in down["checks"]["s3"]["detail"]
        assert down["checks"]["postgres"]["ok"] and down["checks"]["kafka"]["ok"]  # only storage is down
        assert settings.storage.secret_key.get_secret_value() not in str(down)
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(2 * WINDOW, 3 * WINDOW)])
        await wait_for(lambda: _count(db, "SELECT count(*) FROM jobs", 3), timeout_s=60)  # ingest goes on
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        assert await db.fetchval("SELECT count(*) FROM adapters") == released  # nothing released while S3 is away
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'failed'") == 0

        await asyncio.to_thread(private_s3.start)
        back_at = time.monotonic()
        await wait_for(lambda: _health_is(url, 200), timeout_s=60)
        ready_after = time.monotonic() - back_at
        await wait_for(lambda: _count(db, "SELECT count(*) FROM jobs WHERE state = 'released'", 3), timeout_s=240)
        released_after = time.monotonic() - back_at
        await wait_for(lambda: _count(db, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL", 3), timeout_s=30)
        jobs = [dict(r) for r in await db.fetch("SELECT id, window_id, state, version, attempts FROM jobs ORDER BY id")]
        adapters = [dict(r) for r in await db.fetch("SELECT version, job_id, manifest FROM adapters ORDER BY job_id")]
        samples = await db.fetchval("SELECT count(*) FROM samples")
        distinct = await db.fetchval("SELECT count(DISTINCT event_id) FROM samples")
        closed = await db.fetch("SELECT id, samples FROM windows WHERE state = 'closed' ORDER BY id")
        events = [
            AdapterReleased.model_validate_json(r.value or b"")
            for r in await read_all(k.bootstrap_servers, k.released_topic)
        ]
    finally:
        process_tools.stop(worker)
        stop.set()
        await asyncio.gather(engine, return_exceptions=True)
        await db.close()
    log_text = worker_log.read_text()
    print(f"health ready {ready_after:.1f} s and all released {released_after:.1f} s after S3 came back;"
          f" jobs {[(j['id'], j['state'], j['version'], j['attempts']) for j in jobs]}")  # fmt: skip

    assert "S3" in log_text and "is unreachable" in log_text  # the outage did reach the worker...
    assert max(j["attempts"] for j in jobs) > 1  # ...which tried that job again once S3 was back
    assert settings.storage.secret_key.get_secret_value() not in log_text
    assert samples == distinct == 3 * WINDOW and [w["samples"] for w in closed] == [WINDOW] * 3  # no sample lost
    # every window's job ended in exactly one released version
    assert [(j["window_id"], j["state"]) for j in jobs] == [(w["id"], "released") for w in closed]
    assert [(a["job_id"], a["version"]) for a in adapters] == [(j["id"], j["version"]) for j in jobs]
    assert [a["version"] for a in adapters] == ["v1.0", "v1.1", "v1.2"]
    # published: exactly the released versions, each complete in S3 (every file there, sha256 verified)
    assert sorted({e.version for e in events}) == ["v1.0", "v1.1", "v1.2"]
    store = ObjectStore.from_settings(settings.storage)
    assert store.list_versions("tiny-llama") == ["v1.0", "v1.1", "v1.2"]
    for event in events:
        manifest = next(a["manifest"] for a in adapters if a["version"] == event.version)
        assert event.files == manifest["files"] and store.read_manifest("tiny-llama", event.version) == manifest
        store.download_uri(event.uri, tmp_path / "check" / event.version, event.files)  # raises on any mismatch


async def _job_state(db: Database, job_id: int, state: str) -> bool:
    return bool(await db.fetchval("SELECT state = $2 FROM jobs WHERE id = $1", job_id, state))


async def _training(db: Database, job_id: int) -> bool:
    """The job's trainer is training or computing the Fisher (its parent came from S3; its upload is ahead)."""
    progress = await db.fetchval("SELECT progress FROM jobs WHERE id = $1 AND state = 'running'", job_id)
    return bool(progress and (progress.get("step") or progress.get("phase") in ("training", "fisher")))


async def _count(db: Database, query: str, n: int) -> bool:
    return int(await db.fetchval(query)) >= n
