"""Ingest of many model lines in one batch: each event into its line's window, with that line's window policy."""

from __future__ import annotations

import pytest

from streamengine.config.settings import DatabaseSettings, Settings, load_settings
from streamengine.store.db import Database
from streamengine.stream.ingest import IngestPipeline, RawRecord
from tests.kafka_tools import feedback

pytestmark = pytest.mark.integration


class NoSender:
    """Ingest's DLQ sender where no record may be rejected."""

    async def send_and_wait(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing was to go to the DLQ")


def lines_settings(dsn: str) -> Settings:
    return load_settings(
        database={"url": dsn},
        window={"max_samples": 1000},
        models=[
            {"name": "small", "window": {"max_samples": 3}},
            {"name": "big"},
            {"pattern": "tenant-*", "window": {"max_samples": 4}},
        ],
    )


def records(events: list[bytes], start: int = 0) -> list[RawRecord]:
    return [RawRecord("t", i % 2, start + i, None, value, []) for i, value in enumerate(events)]


async def test_one_batch_fills_each_lines_window_by_its_own_policy(pg_dsn: str) -> None:
    settings = lines_settings(pg_dsn)
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    pipeline = IngestPipeline(settings, db, NoSender())  # type: ignore[arg-type]
    models = ["small", "big", "tenant-a", "tenant-b", "tenant-c"]
    events = [feedback(i, model=models[i % 5]) for i in range(50)]  # 10 per line, interleaved
    try:
        first = await pipeline.process(records(events[:25]))  # 5 per line: small closes once, the tenants once
        pipeline.look_first = False  # as ingest writes while no duplicates come
        second = await pipeline.process(records(events[20:], start=20))  # 5 again (stored: dropped), then 5 new
        rows = await db.fetch("SELECT model, state, samples, stored FROM windows ORDER BY model, id")
        stored = await db.fetch(
            "SELECT s.model, w.model AS window_model FROM samples s JOIN windows w ON w.id = s.window_id"
        )
        jobs = await db.fetch("SELECT model, count(*) AS n FROM jobs GROUP BY model ORDER BY model")
        big = await db.fetchrow("SELECT first_offsets, last_offsets FROM windows WHERE model = 'big'")
        small = await db.fetch("SELECT first_offsets, last_offsets FROM windows WHERE model = 'small' ORDER BY id")
    finally:
        await db.close()
    assert (first.inserted, first.duplicates, second.inserted, second.duplicates) == (25, 0, 25, 5)
    assert first.inserted_by_model == {model: 5 for model in models}
    assert len(stored) == 50 and all(r["model"] == r["window_model"] for r in stored)
    windows_of: dict[str, list[tuple[str, int]]] = {}
    for r in rows:
        windows_of.setdefault(r["model"], []).append((r["state"], r["samples"]))
    assert windows_of["small"] == [("closed", 3), ("closed", 3), ("closed", 3), ("open", 1)]
    assert windows_of["big"] == [("open", 10)]
    for tenant in ("tenant-a", "tenant-b", "tenant-c"):
        assert windows_of[tenant] == [("closed", 4), ("closed", 4), ("open", 2)]
    assert {r["model"]: r["n"] for r in jobs} == {"small": 3, "tenant-a": 2, "tenant-b": 2, "tenant-c": 2}
    # offsets merged across batches (partition = offset % 2): big got offsets 1, 6, ..., 46; small 0, 5, ..., 45
    assert (big["first_offsets"], big["last_offsets"]) == ({"0": 6, "1": 1}, {"0": 46, "1": 41})
    assert [(w["first_offsets"], w["last_offsets"]) for w in small] == [
        ({"0": 0, "1": 5}, {"0": 10, "1": 5}),
        ({"0": 20, "1": 15}, {"0": 20, "1": 25}),
        ({"0": 30, "1": 35}, {"0": 40, "1": 35}),
        ({"1": 45}, {"1": 45}),
    ]
    assert second.open_samples == {"small": 1, "big": 10, "tenant-a": 2, "tenant-b": 2, "tenant-c": 2}


async def test_an_event_of_no_configured_line_is_refused_and_policies_are_remembered(pg_dsn: str) -> None:
    pipeline = IngestPipeline(lines_settings(pg_dsn), None, NoSender())  # type: ignore[arg-type]
    batch = pipeline.classify(records([feedback(1, model="tenant-x"), feedback(2, model="other")]))
    assert [row[0].model for row in batch.good] == ["tenant-x"]
    assert [(exc.error_class, str(exc)) for _, exc in batch.bad] == [
        ("unknown_model", "model line 'other' is not configured here")
    ]
    assert pipeline.policies("tenant-x") is pipeline.policies("tenant-x")
    assert pipeline.window_policy("tenant-x").max_samples == 4
    assert pipeline.window_policy("big").max_samples == 1000
