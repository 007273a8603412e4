"""Fisher jobs (`streamengine fisher`, POST /fisher/calculate) on real PostgreSQL, S3 and torch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from streamengine.errors import NotFound
from streamengine.jobs.worker import Worker
from streamengine.store import job_queue, registry
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.engine_tools import fill_window, worker_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_fisher_of_a_released_version_is_recomputed_and_used(make_settings, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = worker_settings(make_settings, tiny_model)
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    try:
        await fill_window(db, 0)
        worker = Worker(settings, db, store, owner="w")
        await worker.run_once()
        released = await registry.get_adapter(db, "tiny-llama", "v1.0")
        assert released.fisher_file == "fisher.safetensors"

        with pytest.raises(NotFound):
            await job_queue.enqueue_fisher(db, "tiny-llama", "v9.9")
        job_id = await job_queue.enqueue_fisher(db, "tiny-llama", "v1.0")
        job = await worker.run_once()
        assert job is not None and job.id == job_id and job.kind == "fisher"
        assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", job_id) == "done"
        updated = await registry.get_adapter(db, "tiny-llama", "v1.0")
        assert updated.fisher_file == f"fisher-job{job_id}-{str(updated.fisher_sha256)[:16]}.safetensors"
        assert updated.manifest == released.manifest  # the version itself is immutable

        folder = await store.adownload_uri(
            updated.uri,
            tmp_path / "check",
            {"fisher.safetensors": released.fisher_sha256, updated.fisher_file: updated.fisher_sha256},
        )
        at_training = load_file(folder / "fisher.safetensors")
        recomputed = load_file(folder / updated.fisher_file)
        assert set(at_training) == set(recomputed)
        for name, tensor in at_training.items():  # same adapter, same window: the same Fisher
            torch.testing.assert_close(recomputed[name], tensor, rtol=1e-4, atol=1e-10)

        # the next training job regularises towards the registry's (recomputed) Fisher
        await fill_window(db, 100)
        await worker.run_once()
        child = await registry.get_adapter(db, "tiny-llama", "production")
        assert child.version == "v1.1" and child.manifest["metrics"]["ewc_penalty"] is not None
    finally:
        await db.close()
