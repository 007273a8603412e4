"""Two model lines on one topic, one engine and one worker: each line's windows, base and versions of its own."""

from __future__ import annotations

import asyncio
import json

import pytest

from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.local.tinymodel import build_tiny_model
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.engine_tools import TRAINING
from tests.kafka_tools import feedback, produce, read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_two_lines_with_their_own_bases_and_windows_release_their_own_versions(  # type: ignore[no-untyped-def]
    make_settings, tiny_model, tmp_path
) -> None:
    other_base = build_tiny_model(tmp_path / "other-base", hidden_size=32, seed=1)
    settings = make_settings(
        model={"base": str(tiny_model)},
        window={"max_samples": 1000},
        training=TRAINING,
        models=[
            {"name": "support", "window": {"max_samples": 12}},
            {"pattern": "tenant-*", "base": str(other_base), "window": {"max_samples": 8}, "lora": {"r": 4}},
        ],
    )
    k = settings.kafka
    values = [feedback(i, model="support") for i in range(12)] + [feedback(100 + i, model="tenant-a") for i in range(8)]
    values.append(feedback(999, model="nobody"))
    stop, ready = asyncio.Event(), asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 60)
    db = await Database.connect(settings.database, migrate=False)
    worker = asyncio.create_task(Worker(settings, db, ObjectStore.from_settings(settings.storage)).run(stop))
    try:
        await produce(k.bootstrap_servers, k.feedback_topic, values)

        async def released():  # type: ignore[no-untyped-def]
            records = await read_all(k.bootstrap_servers, k.released_topic, timeout_s=2)
            return records if len(records) >= 2 else None

        records = await wait_for(released, timeout_s=300, interval_s=1)
        dlq = await read_all(k.bootstrap_servers, k.dlq_topic)
        windows = await db.fetch("SELECT model, samples FROM windows WHERE state = 'closed' ORDER BY model")
    finally:
        stop.set()
        await asyncio.gather(engine, worker, return_exceptions=True)
        await db.close()
    events = {record.key.decode(): json.loads(record.value) for record in records}
    assert set(events) == {"support", "tenant-a"}
    support, tenant = events["support"], events["tenant-a"]
    assert (support["version"], support["window"]["samples"], support["base_model"]) == ("v1.0", 12, str(tiny_model))
    assert (tenant["version"], tenant["window"]["samples"], tenant["base_model"]) == ("v1.0", 8, str(other_base))
    assert (support["lora"]["r"], tenant["lora"]["r"]) == (16, 4)
    assert support["uri"].endswith("/support/v1.0/") and tenant["uri"].endswith("/tenant-a/v1.0/")
    assert [(w["model"], w["samples"]) for w in windows] == [("support", 12), ("tenant-a", 8)]
    assert [dict(r.headers)["error.class"] for r in dlq] == [b"unknown_model"]
