"""The worker's warm trainer under faults, and the job queue's wake-ups, on PostgreSQL, S3 and the tiny Llama.

The warm trainer SIGKILLed mid-job (as the kernel's out-of-memory killer does): the job is retried and
released once, and the next job gets a fresh process. Out of memory in it: the job fails as it does with a
process per job, and the next one trains. The worker stopped mid-job: the job goes back to the queue and
the trainer goes with the worker. A new job wakes an idle worker at once (NOTIFY), and a job whose
notification was lost is found by the slow poll; the outbox relay likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamengine.config.settings import Settings
from streamengine.jobs.worker import Worker
from streamengine.store import job_queue
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.outbox import run_relay
from streamengine.stream.producer import start_producer
from tests import process_tools
from tests.engine_tools import TRAINING, fill_long_window, fill_window, worker_settings
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _job(db: Database, job_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT state, attempts, error, version, lease_owner FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def _state(db: Database, job_id: int, state: str) -> bool:
    return (await _job(db, job_id))["state"] == state


async def _training(db: Database, job_id: int) -> bool:
    progress = await db.fetchval("SELECT progress FROM jobs WHERE id = $1", job_id)
    return bool(progress and progress.get("step"))


@contextlib.asynccontextmanager
async def _worker(settings: Settings, db: Database) -> AsyncIterator[tuple[Worker, asyncio.Event]]:
    """``Worker.run`` in this loop until the block ends (its warm trainer stops with it)."""
    stop = asyncio.Event()
    worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="warm")
    running = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0)  # run() begins: its warm trainer starts in the background
    try:
        yield worker, stop
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)


async def test_a_warm_trainer_killed_mid_job_the_job_is_retried_and_released_once(
    make_settings: Any, tiny_model: Path
) -> None:
    settings = worker_settings(
        make_settings,
        tiny_model,
        worker={"poll_s": 0.2, "heartbeat_s": 0.5},
        training={**TRAINING, "epochs": 400},  # 800 steps: seconds even on a quiet machine, so the kill lands
        learning={"gate": False},  # mid-training (20 epochs ended within a heartbeat); so long a run overfits the
    )  # 16 samples, which the gate would rightly refuse: this test is about the kill, not the gate
    db = await Database.connect(settings.database)
    try:
        async with _worker(settings, db) as (worker, _):
            assert worker.trainer is not None
            first = await worker.trainer.ready()  # started and its base loaded before any job
            assert first is not None and first.bases == [str(tiny_model)]
            await fill_window(db, 0)
            await wait_for(lambda: _training(db, 1), timeout_s=120, interval_s=0.05)
            os.kill(first.pid, signal.SIGKILL)  # the kernel's out-of-memory killer does this
            await wait_for(lambda: _state(db, 1, "released"), timeout_s=180)
            job = await _job(db, 1)
            assert (job["attempts"], job["version"]) == (2, "v1.0")
            second = await worker.trainer.ready()
            assert second is not None and second.pid != first.pid and not process_tools.alive(first.pid)

            await fill_window(db, 100)
            await wait_for(lambda: _state(db, 2, "released"), timeout_s=180)
            third = await worker.trainer.ready()
            assert third is not None and third.pid == second.pid and third.jobs == 2  # job 1's retry, job 2
        rows = await db.fetch("SELECT version, job_id FROM adapters ORDER BY version")
        assert [(r["version"], r["job_id"]) for r in rows] == [("v1.0", 1), ("v1.1", 2)]
        outbox = await db.fetch("SELECT value FROM outbox ORDER BY id")
        assert [r["value"]["version"] for r in outbox] == ["v1.0", "v1.1"]  # released once each
        assert not process_tools.alive(third.pid)  # gone with the worker
    finally:
        await db.close()


async def test_out_of_memory_in_a_warm_trainer_fails_the_job_and_the_next_job_trains(
    make_settings: Any, tiny_model: Path
) -> None:
    # A 1 GiB cap, about twice what the warm trainer holds, and a batch of ~720 samples of 256 tokens (over
    # 2 GiB without a cap); then a normal window under the same cap.
    big_batch = {**TRAINING, "batch_size": 1024, "max_length": 256}
    capped = {"trainer_memory_limit_mb": 1024, "poll_s": 0.2}
    settings = worker_settings(make_settings, tiny_model, training=big_batch, worker=capped)
    db = await Database.connect(settings.database)
    try:
        assert len((await fill_long_window(db, 0, 800)).closed) == 1
        async with _worker(settings, db) as (worker, _):
            assert worker.trainer is not None
            first = await worker.trainer.ready()
            assert first is not None
            await wait_for(lambda: _state(db, 1, "failed"), timeout_s=180)
            job = await _job(db, 1)
            assert (job["attempts"], job["version"]) == (1, None)  # not retried: it would fail again
            assert job["error"].startswith("out of memory: "), job["error"]
            assert "can't allocate memory" in job["error"] or "std::bad_alloc" in job["error"], job["error"]
            assert job["error"].endswith("(worker.trainer_memory_limit_mb = 1024)")

            assert len((await fill_long_window(db, 1000, 16)).closed) == 1
            await wait_for(lambda: _state(db, 2, "released"), timeout_s=180)
            after = await worker.trainer.ready()
            assert after is not None and after.pid != first.pid  # a fresh process took the next job
        assert await db.fetchval("SELECT count(*) FROM adapters") == 1
    finally:
        await db.close()


async def test_a_worker_stopped_mid_job_gives_the_job_back_and_ends_its_warm_trainer(
    make_settings: Any, tiny_model: Path
) -> None:
    settings = worker_settings(
        make_settings, tiny_model, worker={"poll_s": 0.2, "heartbeat_s": 0.5}, training={**TRAINING, "epochs": 500}
    )
    db = await Database.connect(settings.database)
    try:
        async with _worker(settings, db) as (worker, stop):
            assert worker.trainer is not None
            trainer = await worker.trainer.ready()
            assert trainer is not None
            await fill_window(db, 0)
            await wait_for(lambda: _training(db, 1), timeout_s=120)
            status = await db.fetchval("SELECT progress FROM jobs WHERE id = 1")
            assert status["phase"] == "training" and status["phase_started_at"] <= time.time()
            stop.set()
        job = await _job(db, 1)
        assert (job["state"], job["attempts"], job["lease_owner"]) == ("queued", 0, None)
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0
        await wait_for(lambda: not process_tools.alive(trainer.pid), timeout_s=10)
    finally:
        await db.close()


async def _claimed_within(db: Database, job_id: int) -> float:
    """Seconds from the job's window closing to its claim."""
    row = await db.fetchrow(
        "SELECT extract(epoch FROM j.started_at - w.closed_at) AS s FROM jobs j JOIN windows w ON w.id = j.window_id"
        " WHERE j.id = $1 AND j.started_at IS NOT NULL",
        job_id,
    )
    return max(float(row["s"]), 1e-6) if row else 0.0


async def test_a_new_job_wakes_the_worker_and_a_lost_notification_is_made_up_by_the_poll(
    make_settings: Any, tiny_model: Path
) -> None:
    quiet = worker_settings(make_settings, tiny_model, worker={"poll_s": 60.0, "warm": False})
    polling = worker_settings(make_settings, tiny_model, worker={"poll_s": 1.0, "warm": False})
    db = await Database.connect(quiet.database)
    try:
        async with _worker(quiet, db) as (worker, _):
            await wait_for(lambda: worker.wakeups.listening, timeout_s=30)
            await fill_window(db, 0)
            claim_s = await wait_for(lambda: _claimed_within(db, 1), timeout_s=20, interval_s=0.05)
            assert worker.wakeups.notified >= 1 and claim_s < 5.0  # the poll would wait up to 60 s
        # Job 1 went back to the queue when the worker stopped; cancelled as the runbook does, so job 2 can run.
        await db.execute(
            "UPDATE jobs SET state = 'failed', error = 'cancelled by operator', lease_owner = NULL,"
            " finished_at = now() WHERE id = 1"
        )

        await db.execute("ALTER TABLE jobs DISABLE TRIGGER jobs_notify")  # every notification lost from here
        async with _worker(polling, db) as (worker, _):
            await wait_for(lambda: worker.wakeups.listening, timeout_s=30)
            heard = worker.wakeups.notified
            await fill_window(db, 100)
            lost_claim_s = await wait_for(lambda: _claimed_within(db, 2), timeout_s=20, interval_s=0.05)
            assert worker.wakeups.notified == heard and lost_claim_s < 1.0 + 4.0  # within a poll (and some load)
    finally:
        await db.close()
    print(f"\nclaimed {claim_s * 1000:.0f} ms after the window closed (NOTIFY); {lost_claim_s:.2f} s by the poll")


async def _listening(db: Database, channel: str) -> bool:
    """A session of this database LISTENs on ``channel`` (its last statement, as pg_stat_activity shows it)."""
    query = f'LISTEN "{channel}"'
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = $1", query
        )
    )


async def _sent(db: Database, row_id: int) -> bool:
    return bool(await db.fetchval("SELECT sent_at IS NOT NULL FROM outbox WHERE id = $1", row_id))


async def _enqueue(db: Database, topic: str) -> int:
    async with db.pool.acquire() as conn, conn.transaction():
        await job_queue.enqueue(conn, topic, "tiny-llama", {"version": "v1.0"}, {})
        row_id: int = await conn.fetchval("SELECT max(id) FROM outbox")
    return row_id


async def test_a_new_outbox_row_wakes_the_relay_and_a_lost_notification_is_made_up_by_the_poll(
    make_settings: Any,
) -> None:
    settings = make_settings()
    db = await Database.connect(settings.database)
    producer = await start_producer(settings.kafka)
    topic = settings.kafka.released_topic
    try:
        for interval_s, lost in ((60.0, False), (1.0, True)):
            if lost:
                await db.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
            stop = asyncio.Event()
            relay = asyncio.create_task(run_relay(db, producer, stop, interval_s=interval_s))
            await wait_for(lambda: _listening(db, "streamengine_outbox"), timeout_s=30)
            row_id, written = await _enqueue(db, topic), time.monotonic()
            await wait_for(lambda row_id=row_id: _sent(db, row_id), timeout_s=20, interval_s=0.05)
            took = time.monotonic() - written
            stop.set()
            await asyncio.wait_for(relay, 30)
            assert took < (interval_s + 4.0 if lost else 5.0), took  # the poll would wait up to 60 s
    finally:
        await producer.stop()
        await db.close()
