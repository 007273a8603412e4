"""/metrics of a real engine (and a real worker in this process) against what the test made happen."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest

from streamengine.jobs.worker import Worker
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.engine_tools import add_samples, engine_running, metric
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"

COUNTERS = {
    "consumed": ("streamengine_events_consumed_total", {}),
    "invalid_json": ("streamengine_events_rejected_total", {"reason": "invalid_json"}),
    "unknown_model": ("streamengine_events_rejected_total", {"reason": "unknown_model"}),
    "deduplicated": ("streamengine_events_deduplicated_total", {}),
    "stored": ("streamengine_samples_stored_total", {"model": MODEL}),
    "closed": ("streamengine_windows_closed_total", {"model": MODEL, "reason": "threshold"}),
    "writes": ("streamengine_batch_write_seconds_count", {}),
}


async def _counters(http: httpx.AsyncClient) -> dict[str, float]:
    return {key: await metric(http, name, **labels) or 0.0 for key, (name, labels) in COUNTERS.items()}


async def _lag(http: httpx.AsyncClient, topic: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "streamengine_consumer_lag_records" and s.labels["topic"] == topic
    )


async def test_engine_metrics_match_what_was_ingested(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(window={"max_samples": 5}, kafka={"partitions": 1})
    k = settings.kafka
    async with engine_running(settings) as http:
        db = await Database.connect(settings.database, migrate=False)
        try:
            before = await _counters(http)

            async def consumed(n: int) -> bool:
                return (await metric(http, "streamengine_events_consumed_total") or 0) >= before["consumed"] + n

            batch = [feedback(i) for i in range(7)] + [b"{broken", b"not json"] + [feedback(99, model="other")]
            await produce(k.bootstrap_servers, k.feedback_topic, batch)
            await wait_for(lambda: consumed(10))
            await produce(k.bootstrap_servers, k.feedback_topic, [feedback(0), feedback(1)])  # duplicates
            await wait_for(lambda: consumed(12))
            after = await _counters(http)
            delta = {key: after[key] - before[key] for key in after}
            assert (
                delta
                == {
                    "consumed": 12,
                    "invalid_json": 2,
                    "unknown_model": 1,
                    "deduplicated": 2,
                    "stored": 7,
                    "closed": 1,
                    "writes": delta["writes"],
                }
                and delta["writes"] >= 2
            )
            # one window closed at 5 samples; the open one holds the other 2; its job is queued
            assert await metric(http, "streamengine_window_samples", model=MODEL) == 2
            assert await metric(http, "streamengine_window_weight", model=MODEL) == 2.0
            assert await metric(http, "streamengine_jobs", state="queued") == 1
            assert await metric(http, "streamengine_jobs", state="released") == 0
            assert await metric(http, "streamengine_outbox_backlog") == 0
            assert await metric(http, "streamengine_scheduler_next_tick_timestamp_seconds", model=MODEL)

            async def caught_up() -> bool:
                return await _lag(http, k.feedback_topic) == 0

            await wait_for(caught_up, 15)  # idle: the stored offsets get committed too

            # Hold the open window's row lock: ingest fetches 3 more records but cannot store them, so
            # they stay uncommitted: the lag is exactly 3 until the lock goes.
            blocker = await asyncpg.connect(settings.database.url.get_secret_value())
            try:
                holding = blocker.transaction()
                await holding.start()
                await blocker.execute("SELECT 1 FROM windows WHERE state = 'open' FOR UPDATE")
                await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(200, 203)])

                async def lagging() -> bool:
                    return await _lag(http, k.feedback_topic) == 3

                await wait_for(lagging, 20)
                await holding.rollback()
            finally:
                await blocker.close()
            await wait_for(caught_up, 20)
            assert await db.fetchval("SELECT count(*) FROM samples") == 10
        finally:
            await db.close()


@pytest.mark.slow
async def test_worker_metrics_match_the_release(make_settings, tiny_model) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(
        model={"base": str(tiny_model)},
        window={"max_samples": 16},
        training={"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 64},
        learning={"gate": False},
    )
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    released_before = value("streamengine_releases_total", model=MODEL, reason="manual")
    trainings_before = value("streamengine_training_seconds_count")
    uploaded_before = value("streamengine_upload_bytes_total")
    async with engine_running(settings) as http:
        db = await Database.connect(settings.database, migrate=False)
        try:
            await add_samples(db, 0, 16)
            assert (await http.post("/train", json={})).status_code == 202
            worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="metrics-test")
            job = await worker.run_once()
            assert job is not None
            row = await db.fetchrow("SELECT state, error FROM jobs WHERE id = $1", job.id)
            assert row["state"] == "released", row["error"]
            manifest = await db.fetchval("SELECT manifest FROM adapters WHERE job_id = $1", job.id)
            m = manifest["metrics"]
            assert value("streamengine_releases_total", model=MODEL, reason="manual") == released_before + 1
            assert value("streamengine_training_seconds_count") == trainings_before + 1
            assert value("streamengine_upload_bytes_total") == uploaded_before + manifest["size_bytes"]
            assert value("streamengine_upload_seconds_count") >= 1
            assert value("streamengine_training_tokens_per_second") > 0
            assert value("streamengine_training_steps_per_second") > 0
            assert value("streamengine_training_ewc_penalty", model=MODEL) == 0.0  # first version: no parent
            assert value("streamengine_training_loss", model=MODEL) > 0
            for phase in ("before", "after"):
                if m.get(f"eval_loss_{phase}") is not None:
                    assert value("streamengine_eval_loss", model=MODEL, phase=phase) == pytest.approx(
                        m[f"eval_loss_{phase}"]
                    )
            # the engine sees the release in PostgreSQL
            assert await metric(http, "streamengine_jobs", state="released") == 1
            created = await db.fetchval("SELECT extract(epoch FROM created_at) FROM adapters WHERE job_id = $1", job.id)
            assert await metric(http, "streamengine_last_release_timestamp_seconds", model=MODEL) == pytest.approx(
                float(created)
            )

            async def published() -> bool:
                return await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

            await wait_for(published, 20)
            assert await metric(http, "streamengine_outbox_backlog") == 0
            assert json.loads(json.dumps(m))  # metrics are plain JSON
        finally:
            await db.close()
    await asyncio.sleep(0)
