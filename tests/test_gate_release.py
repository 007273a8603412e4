"""The release gate on the real worker: a rejected candidate is recorded and never released."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from streamengine.contract.events import FeedbackEvent
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.jobs.worker import Worker
from streamengine.store import registry, windows
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.engine_tools import TRAINING
from tests.training_tools import pretrained_ok_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def fill(db: Database, start: int, count: int = 24) -> None:
    policy = SamplePolicy(kind_weights={"thumbs_up": 1.0}, holdout_fraction=0.25)
    rows = []
    for i in range(start, start + count):
        event = FeedbackEvent(
            event_id=f"g-{i}", model="tiny-llama", prompt=f"Q{i % 4}?", response=f"A{i % 4}", kind="thumbs_up"
        )
        rows.append((to_sample(event, policy), 0, i))
    closed = await windows.write_batch(db, rows, WindowPolicy(max_samples=count))
    assert len(closed.closed) == 1


def self_anchors(folder: Path, **learning: Any) -> dict[str, Any]:
    """Self anchors from a prompt file answered by the base (the tiny random model cannot write prompts)."""
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"Q{i}?\n" for i in range(16)))
    cfg = {"prompts_path": str(prompts), "magpie": False, "samples": 16, "max_new_tokens": 8, "max_repeat": 1.0}
    return {"self_anchor": cfg, **learning}


async def test_rejected_candidate_is_not_released(make_settings, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    strict = make_settings(model={"base": str(tiny_model)}, training=TRAINING, learning={"min_improvement": 5.0})
    db = await Database.connect(strict.database)
    try:
        await fill(db, 0)
        assert await db.fetchval("SELECT count(*) FROM samples WHERE holdout") > 0
        job = await Worker(strict, db, ObjectStore.from_settings(strict.storage), owner="strict").run_once()
        assert job is not None
        row = await db.fetchrow("SELECT state, error, metrics, version FROM jobs WHERE id = $1", job.id)
        assert row["state"] == "rejected" and row["version"] is None
        assert "no improvement on the new window's holdout" in row["error"]
        assert row["metrics"]["holdout_loss_after"] < row["metrics"]["holdout_loss_before"]  # learned, not enough
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        client = Minio(
            strict.storage.endpoint,
            strict.storage.access_key.get_secret_value(),
            strict.storage.secret_key.get_secret_value(),
            secure=False,
        )
        if client.bucket_exists(strict.storage.bucket):  # the base's self-anchor set may be there, no adapter
            assert list(client.list_objects(strict.storage.bucket, "tiny-llama/", recursive=True)) == []

        normal = make_settings(model={"base": str(tiny_model)}, training=TRAINING, learning=self_anchors(tmp_path))
        await fill(db, 100)
        await Worker(normal, db, ObjectStore.from_settings(normal.storage), owner="normal").run_once()
        released = await registry.get_adapter(db, "tiny-llama", "production")
        assert (released.version, released.parent_version) == ("v1.0", None)  # not built on the rejected one
        assert released.manifest["metrics"]["holdout_improvement"] > 0
        assert released.manifest["metrics"]["retention_loss_before"] is not None  # window 1's holdout
        numbers = released.manifest["metrics"]  # the base skill: the self-anchor set's loss at the base, after
        assert numbers["base_forgetting"] == pytest.approx(numbers["anchor_loss_after"] - numbers["anchor_loss_base"])
    finally:
        await db.close()


async def test_a_candidate_that_loses_the_base_skill_is_refused(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A base that answers "ok" to "q ..." prompts; the window ("Q1?" -> "A1") trained without anchor samples
    overwrites that, and the gate's anchor check (the base's own answers) sees it at the default bound."""
    base = pretrained_ok_model(tmp_path / "base")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"q p{i}\n" for i in range(16)))
    cfg = {"prompts_path": str(prompts), "magpie": False, "samples": 16, "max_new_tokens": 4, "max_repeat": 1.0}
    learning = {"self_anchor": cfg, "anchor_fraction": 0.0}  # the anchor set only checks, it does not train
    training = {"epochs": 4, "batch_size": 4, "learning_rate": 1e-2, "max_length": 64}
    settings = make_settings(model={"base": str(base)}, training=training, learning=learning)
    db = await Database.connect(settings.database)
    try:
        await fill(db, 0)
        job = await Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="w").run_once()
        assert job is not None
        row = await db.fetchrow("SELECT state, error, metrics FROM jobs WHERE id = $1", job.id)
        assert row["state"] == "rejected" and "base skill lost" in row["error"], row["metrics"]
        numbers = row["metrics"]
        assert numbers["base_forgetting"] > 0.1 and numbers["anchor_loss_base"] < 0.1 < numbers["anchor_loss_after"]
        assert await db.fetchval("SELECT count(*) FROM adapters") == 0
    finally:
        await db.close()
