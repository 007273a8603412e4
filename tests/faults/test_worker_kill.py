"""SIGKILL real `streamengine worker` processes mid-training and mid-upload.

Each job is finished by another worker process once the dead one's lease expires; every window yields
exactly one version (registry row, complete S3 folder, one `adapter.released` record), and no record
names an adapter that is not complete in S3 at the moment it is read. The relay publishing the records
is the engine's own (in this process); the trainers are real child processes training the tiny model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased
from streamengine.errors import StreamEngineError
from streamengine.serving import follow
from streamengine.store.db import Database
from streamengine.store.objects import MANIFEST, ObjectStore
from tests import process_tools
from tests.engine_tools import TRAINING, engine_running, fill_window, worker_settings
from tests.faults.stall_proxy import StallProxy
from tests.kafka_tools import read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A trainer process per job (found by its spec path); the warm trainer: tests/faults/test_warm_trainer_faults.py.
LEASE = {"lease_s": 4.0, "heartbeat_s": 1.0, "poll_s": 0.2, "warm": False}
MODEL = "tiny-llama"


@dataclass
class Seen:
    version: str
    problems: list[str]


@dataclass
class ReleaseWatcher:
    """Follows `adapter.released` live and checks each record's adapter in S3 the moment it is read:
    every listed file present with its sha256, the manifest present, and every object written before
    the record was produced."""

    settings: Settings
    store: ObjectStore
    folder: Path
    seen: list[Seen] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        consumer = await follow.open_consumer(self.settings.kafka, "fault-watcher", 100)
        try:
            parts = await follow.partitions(consumer, self.settings.kafka.released_topic)
            assert parts, "the engine creates the topic before it is ready"
            consumer.assign(list(parts))
            await consumer.seek_to_beginning(*parts)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        self.seen.append(await self._check(record))
        finally:
            await consumer.stop()

    async def _check(self, record: Any) -> Seen:
        event = AdapterReleased.model_validate_json(record.value)
        problems: list[str] = []
        try:
            await self.store.adownload_uri(event.uri, self.folder / f"{event.version}-{len(self.seen)}", event.files)
        except StreamEngineError as exc:
            problems.append(f"files: {exc}")
        prefix = self.store.prefix(event.model, event.version)
        for name in [*event.files, MANIFEST]:
            try:
                stat = await asyncio.to_thread(self.store.client.stat_object, self.store.bucket, prefix + name)
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}")
                continue
            # Last-Modified has whole seconds (rounded down): written later than the record is a failure.
            if stat.last_modified is None or stat.last_modified.timestamp() > record.timestamp / 1000:
                problems.append(f"{name} written at {stat.last_modified}, after the record")
        return Seen(event.version, problems)


async def _job(db: Database, job_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT state, attempts, lease_owner, version, progress FROM jobs WHERE id = $1", job_id)
    return dict(row) if row else {}


async def _assert_one_version_per_window(
    db: Database, settings: Settings, store: ObjectStore, watcher: ReleaseWatcher, expected: list[tuple[str, int]]
) -> None:
    """``expected``: (version, job id) per window, in order."""
    versions = [v for v, _ in expected]
    await wait_for(lambda: _seen_at_least(watcher, len(expected)), timeout_s=30)
    rows = await db.fetch("SELECT version, job_id FROM adapters ORDER BY job_id")
    assert [(r["version"], r["job_id"]) for r in rows] == expected
    outbox = await db.fetch("SELECT value, sent_at FROM outbox ORDER BY id")
    assert [r["value"]["version"] for r in outbox] == versions and all(r["sent_at"] for r in outbox)
    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.released_topic)
    assert sorted(AdapterReleased.model_validate_json(r.value).version for r in records) == versions
    assert [s.version for s in watcher.seen] == versions
    assert [s.problems for s in watcher.seen] == [[] for _ in versions]
    assert store.list_all_versions(MODEL) == store.list_versions(MODEL) == versions  # no partial folder


async def _seen_at_least(watcher: ReleaseWatcher, count: int) -> bool:
    return len(watcher.seen) >= count


async def test_workers_killed_during_training_another_finishes_one_version_per_window(
    make_settings: Any, tiny_model: Path, tmp_path: Path
) -> None:
    # Slow enough that a heartbeat (1 s) stores a step before training ends: 200 epochs took under 2 s.
    slow = worker_settings(make_settings, tiny_model, worker=LEASE, training={**TRAINING, "epochs": 2000})
    fast = worker_settings(make_settings, tiny_model, worker=LEASE)
    slow_config = process_tools.write_config(slow, tmp_path / "slow.yaml")
    fast_config = process_tools.write_config(fast, tmp_path / "fast.yaml")
    logs = {name: tmp_path / f"worker-{name}.log" for name in "abc"}
    db = await Database.connect(fast.database)
    store = ObjectStore.from_settings(fast.storage)
    stop = asyncio.Event()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with engine_running(fast):
            watcher = ReleaseWatcher(fast, store, tmp_path / "checks")
            watching = asyncio.create_task(watcher.run(stop))
            await fill_window(db, 0)
            await fill_window(db, 100)  # job 2 waits behind job 1 (one model line trains in order)

            # Kill 1: the worker process alone, the moment its trainer child starts (still importing torch,
            # no output yet). The trainer must die with it rather than run on as an orphan.
            workers.append(process_tools.start(["worker"], slow_config, logs["a"]))
            found = await wait_for(
                lambda: process_tools.children(workers[0].pid, "job-1/spec.json"),
                120,
                interval_s=0.02,
                describe=lambda: logs["a"].read_text()[-3000:],
            )
            trainer = found[0]
            os.kill(workers[0].pid, signal.SIGKILL)
            killed = time.monotonic()
            workers[0].wait(timeout=30)
            await wait_for(lambda: _gone(trainer), timeout_s=10, interval_s=0.02)
            orphan_s = time.monotonic() - killed
            assert orphan_s < 2.0, f"the trainer outlived its killed worker by {orphan_s:.1f}s"
            assert (await _job(db, 1))["state"] == "running"  # its lease still runs

            # Kill 2: a second worker takes the job over once the lease expired; SIGKILL its whole process
            # group mid-training (step >= 1 reported).
            workers.append(process_tools.start(["worker"], slow_config, logs["b"]))
            await wait_for(lambda: _training(db, 1, attempts=2), timeout_s=120)
            takeover_s = time.monotonic() - killed
            process_tools.kill(workers[1])
            killed = time.monotonic()

            # A third worker finishes both jobs.
            workers.append(process_tools.start(["worker"], fast_config, logs["c"]))
            await wait_for(lambda: _states(db, ["released", "released"]), timeout_s=180)
            finish_s = time.monotonic() - killed
            await _assert_one_version_per_window(db, fast, store, watcher, [("v1.0", 1), ("v1.1", 2)])
            job = await _job(db, 1)
            assert (job["attempts"], job["version"]) == (3, "v1.0")
            assert (await _job(db, 2))["attempts"] == 1
            stop.set()
            await watching
    finally:
        stop.set()
        for worker in workers:
            process_tools.kill(worker)
        await db.close()
    assert not process_tools.children(None, str(fast.worker.work_dir)), "a trainer process was left behind"
    print(
        f"\ntrainer gone {orphan_s * 1000:.0f} ms after its worker was killed; job taken over (training again) "
        f"{takeover_s:.1f}s after kill 1 (lease {LEASE['lease_s']}s); both windows released {finish_s:.1f}s "
        f"after kill 2"
    )


async def test_worker_killed_mid_upload_another_releases_once(
    services: Any, make_settings: Any, tiny_model: Path, tmp_path: Path
) -> None:
    settings = worker_settings(make_settings, tiny_model, worker=LEASE)
    # The second file of the version folder never reaches S3: the worker is held exactly mid-upload.
    trigger = f"PUT /{settings.storage.bucket}/{MODEL}/v1.0/adapter_model.safetensors".encode()
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    stop = asyncio.Event()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with StallProxy(services.s3_endpoint, trigger) as proxy, engine_running(settings):
            stalled = worker_settings(make_settings, tiny_model, worker=LEASE, storage={"endpoint": proxy.endpoint})
            watcher = ReleaseWatcher(settings, store, tmp_path / "checks")
            watching = asyncio.create_task(watcher.run(stop))
            await fill_window(db, 0)
            workers.append(
                process_tools.start(
                    ["worker"], process_tools.write_config(stalled, tmp_path / "a.yaml"), tmp_path / "a.log"
                )
            )
            await asyncio.wait_for(proxy.stalled.wait(), 180)
            assert [o.object_name for o in store.client.list_objects(store.bucket, f"{MODEL}/v1.0/")] == [
                f"{MODEL}/v1.0/adapter_config.json"
            ]
            job = await _job(db, 1)
            assert (job["state"], job["attempts"], job["version"]) == ("running", 1, "v1.0")
            assert await db.fetchval("SELECT count(*) FROM adapters") == 0
            assert await db.fetchval("SELECT count(*) FROM outbox") == 0
            process_tools.kill(workers[0])
            killed = time.monotonic()

            workers.append(
                process_tools.start(
                    ["worker"], process_tools.write_config(settings, tmp_path / "b.yaml"), tmp_path / "b.log"
                )
            )
            await wait_for(lambda: _states(db, ["released"]), timeout_s=180)
            release_s = time.monotonic() - killed
            await _assert_one_version_per_window(db, settings, store, watcher, [("v1.0", 1)])
            assert (await _job(db, 1))["attempts"] == 2
            stop.set()
            await watching
    finally:
        stop.set()
        for worker in workers:
            process_tools.kill(worker)
        await db.close()
    assert "released" not in (tmp_path / "a.log").read_text()
    print(f"\nkilled with 1 of 4 files in S3; the next worker released v1.0 {release_s:.1f}s later")


async def _gone(pid: int) -> bool:
    return not process_tools.alive(pid)


async def _training(db: Database, job_id: int, attempts: int) -> bool:
    job = await _job(db, job_id)
    return job.get("attempts") == attempts and bool((job.get("progress") or {}).get("step"))


async def _states(db: Database, states: list[str]) -> bool:
    return [r["state"] for r in await db.fetch("SELECT state FROM jobs ORDER BY id")] == states
