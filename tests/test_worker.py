"""The trainer worker on real PostgreSQL, S3 and torch/peft: releases, versions, lease takeover."""

from __future__ import annotations

import asyncio
import json

import pytest
from minio import Minio

from streamengine.config.settings import LoraSettings
from streamengine.jobs.worker import Worker
from streamengine.store import job_queue, registry
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests import process_tools
from tests.engine_tools import TRAINING, fill_window, worker_settings
from tests.polling import wait_for

pytestmark = pytest.mark.integration


async def test_two_windows_release_v1_0_then_v1_1(make_settings, tiny_model) -> None:  # type: ignore[no-untyped-def]
    settings = worker_settings(make_settings, tiny_model)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        assert len((await fill_window(db, 0)).closed) == 1
        worker = Worker(settings, db, store, owner="w1")
        job = await worker.run_once()
        assert job is not None
        first = await registry.get_adapter(db, "tiny-llama", "production")
        assert first.version == "v1.0" and first.parent_version is None
        assert first.manifest["metrics"]["eval_loss_after"] < first.manifest["metrics"]["eval_loss_before"]
        assert set(first.manifest["files"]) == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "fisher.safetensors",
        }

        assert len((await fill_window(db, 100)).closed) == 1
        # The LoRA settings changed meanwhile: the job continues its parent, and the release says what it is.
        other_lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj"]}
        await Worker(worker_settings(make_settings, tiny_model, lora=other_lora), db, store, owner="w1").run_once()
        second = await registry.get_adapter(db, "tiny-llama", "production")
        assert (second.version, second.parent_version) == ("v1.1", "v1.0")
        assert await registry.alias(db, "tiny-llama", "previous") == "v1.0"
        # the child continued from the parent: it starts where the parent ended on similar data
        assert second.manifest["metrics"]["eval_loss_before"] < first.manifest["metrics"]["eval_loss_before"]

        outbox = await db.fetch("SELECT key, value, headers FROM outbox ORDER BY id")
        assert [r["value"]["version"] for r in outbox] == ["v1.0", "v1.1"]
        assert outbox[0]["headers"]["ce_type"] == "io.streamengine.adapter.released.v1"
        shape = {"r": 16, "alpha": 32, "target_modules": sorted(LoraSettings().target_modules)}
        assert [r["value"]["lora"] for r in outbox] == [shape, shape]
        client = Minio(
            settings.storage.endpoint,
            settings.storage.access_key.get_secret_value(),
            settings.storage.secret_key.get_secret_value(),
            secure=False,
        )
        names = sorted(o.object_name for o in client.list_objects(settings.storage.bucket, "tiny-llama/v1.1/"))
        assert names == [
            f"tiny-llama/v1.1/{n}"
            for n in ("adapter_config.json", "adapter_model.safetensors", "fisher.safetensors", "manifest.json")
        ]
        manifest = json.loads(client.get_object(settings.storage.bucket, "tiny-llama/v1.1/manifest.json").read())
        assert manifest["version"] == "v1.1" and manifest["files"] == second.manifest["files"]
        assert await worker.run_once() is None  # queue empty
    finally:
        await db.close()


async def test_killed_worker_job_is_retried_and_yields_one_version(make_settings, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lease = {"lease_s": 4.0, "heartbeat_s": 1.0, "poll_s": 0.2}
    settings = worker_settings(
        make_settings, tiny_model, worker=lease, training={**TRAINING, "epochs": 5000}
    )  # long enough to be killed mid-training: 200 epochs (one step each) once took 0.9 s, less than one
    # heartbeat, so no progress was ever stored (CI, Dec 2026)
    db = await Database.connect(settings.database)
    try:
        await fill_window(db, 0)
        config = process_tools.write_config(settings, tmp_path / "config.yaml")
        victim = process_tools.start(["worker"], config, tmp_path / "victim.log")

        async def training_started() -> bool:
            progress = await db.fetchval("SELECT progress FROM jobs WHERE id = 1")
            return bool(progress and progress.get("step"))

        try:
            await wait_for(training_started, timeout_s=240)
        except AssertionError:
            process_tools.kill(victim)
            raise AssertionError(
                "the worker never reported training progress:\n" + (tmp_path / "victim.log").read_text()[-3000:]
            ) from None
        process_tools.kill(victim)
        state = await db.fetchrow("SELECT state, attempts, lease_owner FROM jobs WHERE id = 1")
        assert (state["state"], state["attempts"]) == ("running", 1)

        fast = worker_settings(make_settings, tiny_model, worker=lease)
        rescuer = Worker(fast, db, ObjectStore.from_settings(fast.storage), owner="rescuer")
        assert await rescuer.run_once() is None  # lease still held by the dead worker
        await asyncio.sleep(settings.worker.lease_s)
        job = await rescuer.run_once()
        assert job is not None and job.id == 1 and job.attempts == 2
        rows = await db.fetch("SELECT version, job_id FROM adapters")
        assert [(r["version"], r["job_id"]) for r in rows] == [("v1.0", 1)]
        assert await db.fetchval("SELECT state FROM jobs WHERE id = 1") == "released"
        assert await db.fetchval("SELECT count(*) FROM outbox") == 1
        # the dead worker's lease is gone: it could not release a second version
        with pytest.raises(job_queue.Conflict):
            await job_queue.reserve_version(db, 1, state["lease_owner"])
    finally:
        await db.close()


async def test_a_stopping_worker_gives_its_job_back(make_settings, tiny_model) -> None:  # type: ignore[no-untyped-def]
    settings = worker_settings(make_settings, tiny_model, worker={"heartbeat_s": 0.5, "poll_s": 0.2},
                         training={**TRAINING, "epochs": 500})  # fmt: skip
    db = await Database.connect(settings.database)
    try:
        await fill_window(db, 0)
        stop = asyncio.Event()
        worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="leaving")
        running = asyncio.create_task(worker.run(stop))

        async def training_started() -> bool:
            progress = await db.fetchval("SELECT progress FROM jobs WHERE id = 1")
            return bool(progress and progress.get("step"))

        await wait_for(training_started, timeout_s=240)
        stop.set()
        await asyncio.wait_for(running, 30)  # does not wait for the long training to end
        job = await db.fetchrow("SELECT state, attempts, lease_owner FROM jobs WHERE id = 1")
        assert (job["state"], job["attempts"], job["lease_owner"]) == ("queued", 0, None)
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0
    finally:
        await db.close()


async def test_the_learning_options_reach_the_second_job(make_settings, tiny_model, caplog) -> None:  # type: ignore[no-untyped-def]
    """Replay picked by the parent's loss, averaging with the parent and the orthogonality penalty run in a real
    job continuing a parent (the trainer's side of each is tested in test_training_options.py)."""
    learning = {"replay_selection": "loss", "parent_average": 0.25, "orthogonal_weight": 1.0, "gate": False,
                "min_holdout_samples": 0, "anchor_fraction": 0.0}  # fmt: skip
    settings = worker_settings(make_settings, tiny_model, learning=learning)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        worker = Worker(settings, db, store, owner="w1")
        await fill_window(db, 0)
        await worker.run_once()  # no parent: no replay, nothing to average with
        await fill_window(db, 100)  # its replay candidates: all 16 samples of the first window
        with caplog.at_level("INFO", logger="streamengine"):
            await worker.run_once()
        second = await registry.get_adapter(db, "tiny-llama", "production")
        assert second.version == "v1.1"
        picked = [r.getMessage() for r in caplog.records if "replay by loss" in r.getMessage()]
        assert len(picked) == 1 and picked[0].startswith("job 2 replay by loss: kept 5 of 16 candidates"), picked
    finally:
        await db.close()
