"""S3 failing under a real trainer worker: an upload that never completes releases nothing; a retry does.

The worker trains the tiny model for real; the S3 server (SeaweedFS) is stopped after the first file of
the adapter folder went up, so the upload dies midway. Then: no registry row, no outbox row, the job is
queued again. With S3 back, the next attempt uploads the same reserved version and releases it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamengine.jobs.worker import Worker
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.engine_tools import fill_window, worker_settings

pytestmark = pytest.mark.integration


@pytest.mark.slow  # two real training runs (~25 s on 2 cores)
async def test_s3_stopped_mid_upload_releases_nothing_then_a_retry_succeeds(
    services: Any, make_settings: Any, tiny_model: Path
) -> None:
    settings = worker_settings(make_settings, tiny_model)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage, attempts=3, backoff_s=0.05, connect_timeout_s=1)
    real_upload = store.client.fput_object
    uploaded: list[str] = []

    def upload_then_stop_s3(bucket: str, key: str, path: str, **kwargs: Any) -> Any:
        if uploaded and services.s3.running:
            services.s3.stop()  # the first file is in S3, the rest never gets there
        result = real_upload(bucket, key, path, **kwargs)
        uploaded.append(key)
        return result

    store.client.fput_object = upload_then_stop_s3  # type: ignore[method-assign]
    try:
        assert len((await fill_window(db, 0)).closed) == 1
        worker = Worker(settings, db, store, owner="w1")
        try:
            job = await worker.run_once()
        finally:
            services.s3.start()
        assert job is not None and len(uploaded) == 1
        row = await db.fetchrow("SELECT state, attempts, version, error FROM jobs WHERE id = $1", job.id)
        assert (row["state"], row["attempts"], row["version"]) == ("queued", 1, "v1.0")
        assert "S3" in row["error"] and settings.storage.secret_key.get_secret_value() not in row["error"]
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        assert await db.fetchval("SELECT count(*) FROM aliases") == 0
        assert store.list_versions("tiny-llama") == []  # no manifest: not a version
        assert store.list_all_versions("tiny-llama") == ["v1.0"]  # the one file that made it

        store.client.fput_object = real_upload  # type: ignore[method-assign]
        again = await worker.run_once()
        assert again is not None and again.id == job.id
        row = await db.fetchrow("SELECT state, attempts, version FROM jobs WHERE id = $1", job.id)
        assert (row["state"], row["attempts"], row["version"]) == ("released", 2, "v1.0")
        released = await db.fetch("SELECT version, job_id, manifest FROM adapters")
        assert [(r["version"], r["job_id"]) for r in released] == [("v1.0", job.id)]
        assert await db.fetchval("SELECT count(*) FROM outbox") == 1
        assert store.list_versions("tiny-llama") == ["v1.0"]
        manifest = store.read_manifest("tiny-llama", "v1.0")
        assert manifest["files"] == released[0]["manifest"]["files"]
    finally:
        services.ensure_running()
        await db.close()
