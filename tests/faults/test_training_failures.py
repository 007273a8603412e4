"""Training that fails for real: diverging, out of memory, SIGKILLed as the OOM killer does.

Each failed job records why (jobs table and GET /training/status), releases and publishes nothing, and
the next window's job trains and releases. Retry policy under test: a failure the trainer reports
(diverged, out of memory) is final at once; a trainer killed by a signal is retried until
``worker.max_attempts``, then the job fails naming the signal.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased
from streamengine.errors import TrainingError
from streamengine.jobs.trainer_process import TrainingCrashed, run_training
from streamengine.jobs.worker import Worker
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.training.spec import FisherResult, TrainResult
from tests import process_tools
from tests.engine_tools import TRAINING, engine_running, fill_long_window, fill_window, worker_settings
from tests.kafka_tools import read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-llama"


async def _job(db: Database, job_id: int) -> dict[str, Any]:
    return dict(await db.fetchrow("SELECT state, attempts, error, version FROM jobs WHERE id = $1", job_id))


async def _status_jobs(api: httpx.AsyncClient) -> dict[int, dict[str, Any]]:
    response = await api.get("/training/status")
    assert response.status_code == 200, response.text
    return {job["id"]: job for job in response.json()["jobs"]}


async def _only_release(db: Database, settings: Settings, job_id: int) -> None:
    """Exactly one version, v1.0 of job ``job_id``: registry, S3, outbox and one record on the topic."""
    rows = await db.fetch("SELECT version, job_id, parent_version FROM adapters")
    assert [(r["version"], r["job_id"], r["parent_version"]) for r in rows] == [("v1.0", job_id, None)]
    await wait_for(lambda: _all_sent(db), timeout_s=30)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1
    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.released_topic)
    assert [AdapterReleased.model_validate_json(r.value).version for r in records] == ["v1.0"]
    store = ObjectStore.from_settings(settings.storage)
    assert store.list_all_versions(MODEL) == ["v1.0"]  # the failed jobs uploaded nothing


async def _all_sent(db: Database) -> bool:
    return not await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")


async def test_diverging_training_fails_the_job_and_the_next_window_releases(
    make_settings: Any, tiny_model: Path
) -> None:
    settings = worker_settings(make_settings, tiny_model)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        async with engine_running(settings) as api:
            for start in (0, 100, 200):
                await fill_window(db, start)  # jobs 1, 2, 3
            # lr 1e30: NaN at the second step; with one step only (one epoch, one batch), NaN after training. The
            # LoRA on q and k both: their product overflows and the softmax gives NaN (with q alone adapted the
            # random tiny model saturates to a finite uniform loss, which only the release gate can judge).
            qk = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
            cases = [
                (1, {"learning_rate": 1e30, "epochs": 2}, "loss became nan at step 2/2 (epoch 2)"),
                (2, {"learning_rate": 1e30, "epochs": 1, "batch_size": 64}, "the training loss after training is nan"),
            ]
            cases = [(job_id, training, f"training diverged: {reason}") for job_id, training, reason in cases]
            for job_id, training, reason in cases:
                diverging = worker_settings(make_settings, tiny_model, training={**TRAINING, **training}, lora=qk)
                job = await Worker(diverging, db, store, owner=f"diverging-{job_id}").run_once()
                assert job is not None and job.id == job_id
                assert await _job(db, job_id) == {"state": "failed", "attempts": 1, "error": reason, "version": None}
            assert await db.fetchval("SELECT count(*) FROM adapters") == 0
            assert await db.fetchval("SELECT count(*) FROM outbox") == 0
            assert store.list_all_versions(MODEL) == []

            job = await Worker(settings, db, store, owner="sane").run_once()
            assert job is not None and job.id == 3
            assert (await _job(db, 3))["state"] == "released"
            await _only_release(db, settings, 3)
            shown = await _status_jobs(api)
            assert [(shown[i]["state"], shown[i]["error"]) for i in (1, 2)] == [("failed", r) for _, _, r in cases]
            assert shown[3]["state"] == "released"
    finally:
        await db.close()


async def test_out_of_memory_fails_the_job_with_the_reason_and_the_next_window_releases(
    make_settings: Any, tiny_model: Path
) -> None:
    # Job 1: a cap far too low for the trainer even to start (its libraries cannot load). Job 2: a 1 GiB cap,
    # about twice what a normal job of the tiny model takes, and ~720 samples of 256 tokens in one batch (over
    # 2 GiB without a cap). Job 3: a normal window under the same 1 GiB cap.
    big_batch = {**TRAINING, "batch_size": 1024, "max_length": 256}
    settings = worker_settings(make_settings, tiny_model, training=big_batch, worker={"trainer_memory_limit_mb": 1024})
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        async with engine_running(settings) as api:
            assert len((await fill_long_window(db, 0, 16)).closed) == 1
            assert len((await fill_long_window(db, 100, 800)).closed) == 1
            assert len((await fill_long_window(db, 1000, 16)).closed) == 1

            tiny_cap = worker_settings(
                make_settings, tiny_model, training=big_batch, worker={"trainer_memory_limit_mb": 64}
            )
            started = time.monotonic()
            assert (await Worker(tiny_cap, db, store, owner="starved").run_once()) is not None
            starved_s = time.monotonic() - started
            job = await _job(db, 1)
            assert (job["state"], job["attempts"]) == ("failed", 1)  # not retried: it would fail again
            # What fails first varies (the loader, OpenBLAS, Python, libtorch's std::bad_alloc, which aborts):
            # the child exits or is aborted, and its last line names the allocation.
            ended = r"out of memory: training process (exited with code \d+|killed by signal 6 \(SIGABRT\))"
            assert re.match(ended, job["error"]), job["error"]
            assert job["error"].endswith("(worker.trainer_memory_limit_mb = 64)")

            worker = Worker(settings, db, store, owner="capped")
            started = time.monotonic()
            assert (await worker.run_once()) is not None
            oom_s = time.monotonic() - started
            job = await _job(db, 2)
            assert (job["state"], job["attempts"], job["version"]) == ("failed", 1, None)
            # torch's allocator raises (RuntimeError: can't allocate memory); a small C++ allocation may abort.
            assert job["error"].startswith("out of memory: "), job["error"]
            assert "can't allocate memory" in job["error"] or "std::bad_alloc" in job["error"], job["error"]
            assert job["error"].endswith("(worker.trainer_memory_limit_mb = 1024)")

            assert (await worker.run_once()) is not None  # the next window, same cap
            assert (await _job(db, 3))["state"] == "released"
            await _only_release(db, settings, 3)
            shown = await _status_jobs(api)
            assert [(shown[i]["state"], shown[i]["error"]) for i in (1, 2)] == [
                ("failed", (await _job(db, i))["error"]) for i in (1, 2)
            ]
    finally:
        await db.close()
    print(f"\ntrainer starved at start failed in {starved_s:.1f}s; out-of-memory batch failed in {oom_s:.1f}s")


async def test_trainer_sigkilled_like_the_oom_killer_is_retried_then_failed(
    make_settings: Any, tiny_model: Path
) -> None:
    cold = {"max_attempts": 2, "poll_s": 0.2, "warm": False}  # a trainer process per job, found by its spec path
    settings = worker_settings(make_settings, tiny_model, worker=cold)
    marker = str(Path(settings.worker.work_dir) / "job-1" / "spec.json")
    db = await Database.connect(settings.database)
    stop = asyncio.Event()
    kills: list[float] = []
    try:
        async with engine_running(settings) as api:
            await fill_window(db, 0)
            await fill_window(db, 100)
            worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="w")
            running = asyncio.create_task(worker.run(stop))
            for attempt in (1, 2):  # the kernel's OOM killer sends SIGKILL to the biggest process: the trainer
                trainer = await wait_for(lambda: _trainer(marker), timeout_s=120, interval_s=0.05)
                assert (await _job(db, 1))["attempts"] == attempt
                os.kill(trainer, signal.SIGKILL)
                kills.append(time.monotonic())
                await wait_for(lambda pid=trainer: _gone(pid), timeout_s=10)
            await wait_for(lambda: _state(db, 2, "released"), timeout_s=180)
            stop.set()
            await asyncio.wait_for(running, 30)
            job = await _job(db, 1)
            assert (job["state"], job["attempts"], job["version"]) == ("failed", 2, None)
            assert job["error"].startswith(
                "training process killed by signal 9 (SIGKILL; the kernel's out-of-memory killer sends it)"
            )
            await _only_release(db, settings, 2)
            assert (await _status_jobs(api))[1]["error"] == job["error"]
    finally:
        stop.set()
        await db.close()
    print(f"\nthe retry's trainer was running (and killed) {kills[1] - kills[0]:.1f}s after the first kill")


async def _trainer(marker: str) -> int | None:
    found = process_tools.children(os.getpid(), marker)
    return found[0] if found else None


async def _gone(pid: int) -> bool:
    return not process_tools.alive(pid)


async def _state(db: Database, job_id: int, state: str) -> bool:
    return (await _job(db, job_id))["state"] == state


ABORT_ON_BAD_ALLOC = (
    "import os, sys; sys.stderr.write(\"terminate called after throwing an instance of 'std::bad_alloc'\\n"
    '  what():  std::bad_alloc\\n"); sys.stderr.flush(); os.abort()'
)


@pytest.mark.parametrize(
    ("code", "out_of_memory"),
    [(ABORT_ON_BAD_ALLOC, True), ("import os; os.abort()", False), ("import sys; sys.exit(5)", False)],
)
async def test_how_a_child_that_reported_nothing_ended_is_classified(
    tmp_path: Path, code: str, out_of_memory: bool
) -> None:
    """A C++ allocation failure aborts the process (SIGABRT): out of memory, final. Other deaths: retryable."""

    with pytest.raises(TrainingError) as failure:
        await run_training([sys.executable, "-c", code], tmp_path / "train.log", TrainResult, memory_limit_mb=512)
    message = str(failure.value)
    assert message.startswith("out of memory") == out_of_memory
    assert isinstance(failure.value, TrainingCrashed) != out_of_memory
    if out_of_memory:
        assert "SIGABRT" in message and "std::bad_alloc" in message and "trainer_memory_limit_mb = 512" in message


async def test_a_result_line_that_does_not_fit_the_model_is_a_final_error(tmp_path: Path) -> None:
    code = 'print(\'{"event": "result", "path": "f.safetensors"}\')'  # a FisherResult without its seconds
    with pytest.raises(TrainingError, match="invalid FisherResult") as failure:
        await run_training([sys.executable, "-c", code], tmp_path / "fisher.log", FisherResult)
    assert not isinstance(failure.value, TrainingCrashed)
    good = 'print(\'{"event": "result", "path": "f.safetensors", "seconds": 1.5}\')'
    result = await run_training([sys.executable, "-c", good], tmp_path / "fisher.log", FisherResult)
    assert result == FisherResult(path="f.safetensors", seconds=1.5)
