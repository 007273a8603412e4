"""The self-anchor set on real S3: built once per base by the child process, stored with its sha256, reused by
later jobs, built again for another base; the user's anchor set wins over it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from streamengine.jobs.anchors import ANCHOR_FILE, SET_VERSION, job_anchor_set, set_name
from streamengine.jobs.trainer_process import run_training
from streamengine.local.tinymodel import build_tiny_model
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore

pytestmark = pytest.mark.integration


async def test_self_anchor_set_is_built_once_per_base_stored_and_reused(make_settings, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"question {i}\n" for i in range(8)))
    cfg = {"prompts_path": str(prompts), "magpie": False, "samples": 6, "max_new_tokens": 6, "max_repeat": 1.0}
    settings = make_settings(model={"base": str(tiny_model)}, learning={"self_anchor": cfg})
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage)
    await store.aensure_bucket()
    builds: list[list[str]] = []

    async def run_child(argv: list[str], log_path: Path, result_type: Any) -> Any:
        builds.append(argv)
        return await run_training(argv, log_path, result_type)

    try:
        first = await job_anchor_set(settings, db, store, tmp_path / "job1", run_child)
        assert first is not None and len(builds) == 1
        rows = [json.loads(line) for line in first.read_text().splitlines()]
        assert 0 < len(rows) <= 6 and all(r["prompt"].startswith("question ") for r in rows)
        manifest = store.read_manifest(set_name(settings), SET_VERSION)
        assert manifest["files"] == {ANCHOR_FILE: hashlib.sha256(first.read_bytes()).hexdigest()}
        assert manifest["base_model"] == str(tiny_model) and manifest["samples"] == len(rows)
        assert manifest["sources"] == {"prompts": len(rows)}
        assert set(manifest["dropped"]) == {"unfinished", "empty", "duplicate", "repeat"}

        again = await job_anchor_set(settings, db, store, tmp_path / "job2", run_child)
        assert again is not None and again.read_bytes() == first.read_bytes() and len(builds) == 1  # reused

        other = make_settings(
            model={"base": str(build_tiny_model(tmp_path / "other", seed=1))}, learning={"self_anchor": cfg}
        )
        assert set_name(other) != set_name(settings)
        assert await job_anchor_set(other, db, store, tmp_path / "job3", run_child) is not None
        assert len(builds) == 2  # another base: another set

        user_set = tmp_path / "anchors.jsonl"
        user = make_settings(model={"base": str(tiny_model)}, learning={"anchor_path": str(user_set)})
        assert await job_anchor_set(user, db, store, tmp_path / "job4", run_child) == user_set
        off = make_settings(model={"base": str(tiny_model)}, learning={"self_anchor": {"enabled": False}})
        assert await job_anchor_set(off, db, store, tmp_path / "job5", run_child) is None
        assert len(builds) == 2
    finally:
        await db.close()
