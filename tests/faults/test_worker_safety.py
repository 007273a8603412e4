"""A live worker keeps its job: leases through connection loss and slow uploads, idempotent Fisher retries,
releases serialised with deploys, and a training child that sees none of the worker's secrets.

Real PostgreSQL (backends terminated with ``pg_terminate_backend``, rows held locked), a real S3 server
behind a stalling TCP proxy, real training children of the tiny model and a real torchrun.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from streamengine.contract.events import AdapterReleased
from streamengine.errors import Conflict
from streamengine.jobs.lease import Lease, LeaseLost
from streamengine.jobs.trainer_process import run_training
from streamengine.jobs.worker import Worker
from streamengine.store import job_queue, registry
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests import process_tools
from tests.engine_tools import TRAINING, add_adapter, fill_window, worker_settings
from tests.faults.stall_proxy import StallProxy
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-llama"
LEASE = {"lease_s": 3.0, "heartbeat_s": 0.5, "poll_s": 0.2}


async def _job(db: Database, job_id: int = 1) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT state, attempts, lease_owner, progress, lease_expires_at > now() AS leased FROM jobs WHERE id = $1",
        job_id,
    )
    return dict(row) if row else {}


async def _step(db: Database) -> int:
    return int(((await _job(db)).get("progress") or {}).get("step") or 0)


@asynccontextmanager
async def _workers(*workers: Worker) -> AsyncIterator[asyncio.Event]:
    """``workers`` running their loops; stopped (and awaited) on leaving."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


class LeaseWatch:
    """What job 1 went through while it ran: its owners and phases, and how often its lease was found lapsed."""

    def __init__(self) -> None:
        self.owners: set[str] = set()
        self.phases: set[str] = set()
        self.lapsed = 0


@asynccontextmanager
async def _watching(db: Database) -> AsyncIterator[LeaseWatch]:
    watch = LeaseWatch()

    async def poll() -> None:
        while True:
            job = await _job(db)
            if job.get("state") == "running":
                watch.owners.add(job["lease_owner"])
                watch.phases.add((job["progress"] or {}).get("phase"))
                watch.lapsed += not job["leased"]
            await asyncio.sleep(0.1)

    task = asyncio.create_task(poll())
    try:
        yield watch
    finally:
        task.cancel()


async def _released_once(db: Database, watch: LeaseWatch, owner: str) -> None:
    """Job 1 released on its first attempt by ``owner``, its lease never lapsed, one version, one event."""
    await wait_for(lambda: _state_is(db, "released"), timeout_s=180)
    job = await _job(db)
    assert (job["attempts"], watch.owners, watch.lapsed) == (1, {owner}, 0)
    rows = await db.fetch("SELECT version, job_id FROM adapters")
    assert [(r["version"], r["job_id"]) for r in rows] == [("v1.0", 1)]
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def _state_is(db: Database, state: str) -> bool:
    return (await _job(db)).get("state") == state


async def test_heartbeats_survive_terminated_connections(
    make_settings: Any, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's database connection is terminated under a heartbeat, three times, mid-training: the
    heartbeats retry, the lease never lapses, and a second worker waiting for work never takes the job over.
    (The heartbeat task used to die on the first error, silently.)"""
    # 1200 steps: the job trains for seconds even on a quiet machine with a warm trainer (60 epochs ended before
    # the three terminations did)
    settings = worker_settings(make_settings, tiny_model, worker=LEASE, training={**TRAINING, "epochs": 600})
    url = settings.database.url.get_secret_value()
    victim_db = settings.database.model_copy(update={"url": SecretStr(url + "?application_name=se-victim")})
    db = await Database.connect(settings.database)
    vdb = await Database.connect(victim_db)
    store = ObjectStore.from_settings(settings.storage)
    try:
        await fill_window(db, 0)
        async with _watching(db) as watch, _workers(Worker(settings, vdb, store, owner="victim")):
            await wait_for(lambda: _step(db), timeout_s=120)
            async with _workers(Worker(settings, db, store, owner="rescuer")):
                for _ in range(3):  # a heartbeat in flight (held on the job's row), its connection terminated
                    async with db.pool.acquire() as conn, conn.transaction():
                        await conn.execute("SELECT 1 FROM jobs WHERE id = 1 FOR UPDATE")
                        await wait_for(
                            lambda: _terminate_waiting(db, "se-victim"),
                            timeout_s=10,
                            interval_s=0.05,
                            describe=lambda: "no heartbeat of the worker reached the database any more",
                        )
                step = await _step(db)
                await wait_for(lambda: _later_step(db, step), timeout_s=30)  # heartbeats carry progress again
                await _released_once(db, watch, "victim")
        assert caplog.text.count("lease renewal failed") >= 3
    finally:
        await vdb.close()
        await db.close()


async def _later_step(db: Database, step: int) -> bool:
    return await _step(db) > step


async def _terminate_waiting(db: Database, application: str) -> int:
    """Terminate the backends of ``application`` that wait for a lock; how many there were."""
    killed: int = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND wait_event_type = 'Lock'",
        application,
    )
    return killed


async def test_a_slow_upload_keeps_the_lease(services: Any, make_settings: Any, tiny_model: Path) -> None:
    """One file's upload hangs for three leases (until the S3 client's read timeout, then retried): the lease
    stays alive all along, and the worker polling beside it never takes the job over."""
    settings = worker_settings(make_settings, tiny_model, worker=LEASE)
    trigger = f"PUT /{settings.storage.bucket}/{MODEL}/v1.0/adapter_model.safetensors".encode()
    stall_s = 3 * LEASE["lease_s"]
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        async with StallProxy(services.s3_endpoint, trigger) as proxy:
            slow = settings.storage.model_copy(update={"endpoint": proxy.endpoint})
            uploader = Worker(settings, db, ObjectStore.from_settings(slow, read_timeout_s=stall_s), owner="uploader")
            await fill_window(db, 0)
            async with _watching(db) as watch, _workers(uploader):
                await asyncio.wait_for(proxy.stalled.wait(), 120)
                stalled = time.monotonic()
                async with _workers(Worker(settings, db, store, owner="rescuer")):
                    await _released_once(db, watch, "uploader")
                    assert time.monotonic() - stalled > 1.5 * LEASE["lease_s"]
                    assert "uploading" in watch.phases
    finally:
        await db.close()


async def test_a_lease_that_cannot_be_renewed_stops_the_job(make_settings: Any, tiny_model: Path) -> None:
    """PostgreSQL stops answering the heartbeats (the job's row held locked) for longer than the lease: the
    worker stops training within the lease and gives the job up unreleased; the next worker claims and
    releases it."""
    endless = {**TRAINING, "epochs": 5000}
    cold = {**LEASE, "warm": False}  # a trainer process of its own, found by its spec path
    settings = worker_settings(make_settings, tiny_model, worker=cold, training=endless)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        await fill_window(db, 0)
        running = asyncio.create_task(Worker(settings, db, store, owner="cut-off").run_once())
        await wait_for(lambda: _step(db), timeout_s=120)
        trainer = process_tools.children(os.getpid(), "job-1/spec.json")
        assert trainer
        async with db.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = 1 FOR UPDATE")
            held = time.monotonic()
            await asyncio.wait({running}, timeout=2 * LEASE["lease_s"])
            stopped_s = time.monotonic() - held
            trainer_alive = any(process_tools.alive(pid) for pid in trainer)
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            raise AssertionError(f"training went on {stopped_s:.1f}s after its lease could not be renewed")
        assert not trainer_alive
        job = await _job(db)
        assert (job["state"], job["attempts"], job["lease_owner"], job["leased"]) == ("running", 1, "cut-off", False)
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0

        rescuer = Worker(worker_settings(make_settings, tiny_model, worker=LEASE), db, store, owner="rescuer")
        assert await rescuer.run_once() is not None
        assert ((await _job(db))["state"], (await _job(db))["attempts"]) == ("released", 2)
    finally:
        await db.close()
    print(f"\nheartbeats blocked: training stopped {stopped_s:.1f}s later (lease {LEASE['lease_s']}s)")


async def test_a_lease_ends_with_the_job_or_with_its_owner(make_settings: Any) -> None:
    """Renewals move the lease on; the work after the job's last step is not cut short (no renewal is due
    then); a lease another worker took stops the work at the next renewal."""
    settings = make_settings(worker=LEASE)
    db = await Database.connect(settings.database)
    try:
        await fill_window(db, 0)
        await fill_window(db, 100)
        claimed = time.monotonic()
        job = await job_queue.claim(db, "w", LEASE["lease_s"], 3)
        assert job is not None
        lease = Lease(db, job.id, "w", settings.worker, claimed)
        expiries = [await db.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", job.id)]

        async def finish() -> str:
            await asyncio.sleep(1.2)  # two renewals
            expiries.append(await db.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", job.id))
            async with lease.last_step():
                await job_queue.finish_unreleased(db, job.id, "w", "rejected", "test")
            await asyncio.sleep(1.2)  # cleaning up after the last step
            return "finished"

        assert await lease.hold(finish()) == "finished"
        assert expiries[1] > expiries[0]

        claimed = time.monotonic()
        second = await job_queue.claim(db, "w", LEASE["lease_s"], 3)
        assert second is not None
        lease = Lease(db, second.id, "w", settings.worker, claimed)
        await db.execute("UPDATE jobs SET lease_owner = 'thief' WHERE id = $1", second.id)
        started = time.monotonic()
        with pytest.raises(LeaseLost, match="another worker holds the lease"):
            await lease.hold(asyncio.sleep(60))
        assert time.monotonic() - started < 2 * LEASE["heartbeat_s"]
    finally:
        await db.close()


async def test_work_that_fails_as_it_enters_a_phase_ends_its_lease(make_settings: Any) -> None:
    """Work that enters a phase and fails at once (a diverged job: phase "evaluating", then the error) ends
    ``hold`` with its error, and the renewals stop. The new phase woke the renewal loop in the same loop
    iteration as its cancellation, and Python 3.11's ``asyncio.wait_for`` returned instead of raising: the
    lease was renewed forever and the worker hung (CI, test_diverging_training_fails_the_job...)."""
    settings = make_settings(worker=LEASE)
    db = await Database.connect(settings.database)
    try:
        await fill_window(db, 0)
        claimed = time.monotonic()
        job = await job_queue.claim(db, "w", LEASE["lease_s"], 3)
        assert job is not None
        for _ in range(5):
            lease = Lease(db, job.id, "w", settings.worker, claimed)

            async def diverge(lease: Lease = lease) -> None:
                await asyncio.sleep(0.1)
                lease.phase("evaluating")
                raise Conflict("training diverged")

            with pytest.raises(Conflict, match="diverged"):
                await asyncio.wait_for(lease.hold(diverge()), 5 * LEASE["heartbeat_s"])
            claimed = time.monotonic()
        renewed = await db.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", job.id)
        await asyncio.sleep(2 * LEASE["heartbeat_s"])
        assert await db.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", job.id) == renewed
    finally:
        await db.close()


async def test_a_retried_fisher_job_accepts_its_stored_object(
    make_settings: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """A Fisher job whose worker died after storing the file and before recording it runs again and ends
    done, pointing at the stored object (it used to fail on every retry: the object existed)."""
    settings = worker_settings(make_settings, tiny_model)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        await fill_window(db, 0)
        worker = Worker(settings, db, store, owner="w")
        await worker.run_once()
        released = await registry.get_adapter(db, MODEL, "v1.0")
        job_id = await job_queue.enqueue_fisher(db, MODEL, "v1.0")
        await worker.run_once()
        first = await registry.get_adapter(db, MODEL, "v1.0")
        assert first.fisher_file is not None and first.fisher_file.startswith(f"fisher-job{job_id}")
        # What a worker that died between the upload and the commit leaves: the object, the job running, the
        # registry on the old file.
        await db.execute(
            "UPDATE jobs SET state = 'running', lease_owner = 'dead', lease_expires_at = now(), finished_at = NULL"
            " WHERE id = $1",
            job_id,
        )
        await db.execute(
            "UPDATE adapters SET fisher_file = 'fisher.safetensors', fisher_sha256 = $1 WHERE version = 'v1.0'",
            released.fisher_sha256,
        )
        retried = await worker.run_once()
        assert retried is not None and (retried.id, retried.attempts) == (job_id, 2)
        assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", job_id) == "done"
        again = await registry.get_adapter(db, MODEL, "v1.0")
        assert again.fisher_file is not None and again.fisher_file.startswith(f"fisher-job{job_id}-")
        assert again.fisher_sha256 is not None
        await store.adownload_uri(again.uri, tmp_path / "check", {again.fisher_file: again.fisher_sha256})
        print(f"\nretry stored {'the same bytes' if again.fisher_file == first.fisher_file else 'other bytes'}")
    finally:
        await db.close()


async def test_an_added_file_is_immutable_and_its_retry_idempotent(make_settings: Any, tmp_path: Path) -> None:
    store = ObjectStore.from_settings(make_settings().storage)
    await store.aensure_bucket()
    file = tmp_path / "fisher-job1-x.safetensors"
    file.write_bytes(b"first")
    digest = await store.aadd_file(file, MODEL, "v1.0")
    assert await store.aadd_file(file, MODEL, "v1.0") == digest  # the same bytes again: accepted
    file.write_bytes(b"other")
    with pytest.raises(Conflict, match="other bytes"):
        await store.aadd_file(file, MODEL, "v1.0")


async def _lock_waits(db: Database, count: int) -> bool:
    """``count`` backends of this database (or more) wait for a lock."""
    waiting: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return waiting >= count


async def test_a_release_beside_a_deploy_leaves_consistent_aliases(make_settings: Any) -> None:
    """A worker releases v1.2 while an operator deploys v1.0 (production v1.1, previous v1.0), both held where
    they move the aliases (the `previous` row locked by the test), then let go: the aliases end as one order
    of the two leaves them, never `previous` = v1.1 (production as both read it before the other committed).
    Release takes the model line's lock as deploy and rollback do; before, only the foreign-key lock its
    INSERT takes on the model line kept the two apart (this test passes there too)."""
    settings = make_settings()
    topic = settings.kafka.released_topic
    db = await Database.connect(settings.database)
    try:
        for version in ("v1.0", "v1.1"):
            await add_adapter(db, version)
            await registry.deploy(db, MODEL, version, topic, None)
        await fill_window(db, 0)
        job = await job_queue.claim(db, "w", 60, 3)
        assert job is not None and await job_queue.reserve_version(db, job.id, "w") == "v1.2"
        stored = (await registry.get_adapter(db, MODEL, "v1.1")).manifest
        event = AdapterReleased(
            **{**stored, "event_id": "e-1", "version": "v1.2", "parent_version": "v1.1", "uri": "s3://b/m/v1.2/"}
        )
        async with db.pool.acquire() as blocker, blocker.transaction():
            await blocker.execute("SELECT 1 FROM aliases WHERE model = $1 AND alias = 'previous' FOR UPDATE", MODEL)
            deploying = asyncio.create_task(registry.deploy(db, MODEL, "v1.0", topic, None))
            await wait_for(lambda: _lock_waits(db, 1), timeout_s=10, interval_s=0.02)
            releasing = asyncio.create_task(job_queue.release(db, job.id, "w", event, topic, None))
            await wait_for(lambda: _lock_waits(db, 2), timeout_s=10, interval_s=0.02)
        await asyncio.wait_for(asyncio.gather(deploying, releasing), 30)
        aliases = {r["alias"]: r["version"] for r in await db.fetch("SELECT alias, version FROM aliases")}
        assert (aliases["production"], aliases["previous"]) in {("v1.2", "v1.0"), ("v1.0", "v1.2")}
        last = await db.fetchval("SELECT value->>'version' FROM outbox ORDER BY id DESC LIMIT 1")
        assert last == aliases["production"]  # the latest record names what production is
    finally:
        await db.close()


class Environment(BaseModel):
    env: dict[str, str]


SECRETS = {
    "STREAMENGINE_DATABASE__URL": "postgresql://se:pg-secret-1@db:5432/se",
    "STREAMENGINE_STORAGE__ACCESS_KEY": "s3-access-2",
    "STREAMENGINE_STORAGE__SECRET_KEY": "s3-secret-3",
    "STREAMENGINE_SIGNING_KEY": "signing-key-4",
    "STREAMENGINE_API__TOKEN": "api-token-5",
    "STREAMENGINE_KAFKA__SASL_PASSWORD": "kafka-password-6",
    "AWS_ACCESS_KEY_ID": "aws-id-7",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-8",
    "PGPASSWORD": "pg-password-9",
}
NEEDED = {
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HOME": "/tmp/hf-home",
    "TORCH_HOME": "/tmp/torch-home",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NCCL_DEBUG": "WARN",
    "TOKENIZERS_PARALLELISM": "false",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
}
DUMP = """
import json, os
if os.environ.get("RANK", "0") == "0":
    print(json.dumps({"event": "result", "env": dict(os.environ)}), flush=True)
"""


async def test_the_training_child_sees_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real child started as the worker starts its trainers, through torchrun with two processes: rank 0
    reports its environment. No secret of the worker is in it; what training needs (CUDA, torch, Hugging
    Face, locale, Python, paths) and what torchrun sets for its ranks are."""
    for name, value in {**SECRETS, **NEEDED}.items():
        monkeypatch.setenv(name, value)
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    result = await run_training([*argv, str(script)], tmp_path / "child.log", Environment)
    env = result.env
    leaked = [name for name, value in SECRETS.items() if any(value in seen for seen in env.values())]
    assert not leaked, f"the child saw {leaked}"
    assert not [name for name in env if name.startswith(("STREAMENGINE_", "AWS_", "PG"))]
    assert {name: env.get(name) for name in NEEDED} == NEEDED
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == os.environ["HOME"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "2", "0") and env["MASTER_PORT"]
