"""Workers across model lines: lines with work take turns, one job per line at a time, no line starves the rest."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from streamengine.config.lines import Lines
from streamengine.config.settings import DatabaseSettings, load_settings
from streamengine.jobs.scheduler import tick_lines
from streamengine.store import job_queue
from streamengine.store.db import Database
from tests.engine_tools import add_samples

pytestmark = pytest.mark.integration

BUSY = "busy"
OTHERS = [f"line-{n:02d}" for n in range(19)]


async def test_a_line_with_a_backlog_does_not_hold_the_workers(pg_dsn: str) -> None:
    """20 lines, the busy one with 10 queued windows (the oldest jobs), two workers claiming as the worker does:
    every other line's first job starts before the busy line's third, and no line ever runs two jobs at once."""
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    await add_samples(db, 0, 10, model=BUSY, max_samples=1)  # ten windows closed: jobs 1..10
    for n, model in enumerate(OTHERS):
        await add_samples(db, 100 + n, 1, model=model, max_samples=1)
    total = 10 + len(OTHERS)
    starts: list[str] = []
    running: set[str] = set()

    async def worker(owner: str) -> None:
        while len(starts) < total:
            job = await job_queue.claim(db, owner, lease_s=60, max_attempts=3)
            if job is None:
                await asyncio.sleep(0.01)
                continue
            assert job.model not in running, f"{job.model} runs two jobs at once"
            running.add(job.model)
            starts.append(job.model)
            await asyncio.sleep(0.02)  # training
            running.discard(job.model)
            await job_queue.finish_unreleased(db, job.id, owner, "rejected", "scheduling test")

    try:
        await asyncio.wait_for(asyncio.gather(worker("w1"), worker("w2")), timeout=60)
        left = await db.fetchval("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
    finally:
        await db.close()
    assert sorted(starts) == sorted([BUSY] * 10 + OTHERS) and left == 0
    third = [i for i, model in enumerate(starts) if model == BUSY][2]
    late = [model for model in OTHERS if starts.index(model) > third]
    assert not late, f"first jobs of {late} started after the busy line's third: {starts}"


async def test_the_tick_fires_per_line_on_each_lines_schedule(pg_dsn: str) -> None:
    """Named lines and pattern-matched lines with an open window tick, each on its own schedule and min_samples;
    a line no entry matches any more does not."""
    settings = load_settings(
        database={"url": pg_dsn},
        window={"schedule": "0 2 * * 1"},  # Mondays
        models=[
            {"name": "weekly"},
            {"name": "daily", "window": {"schedule": "0 3 * * *"}},
            {"name": "picky", "window": {"min_samples": 5}},
            {"pattern": "tenant-*"},
        ],
    )
    db = await Database.connect(settings.database)
    try:
        for n, model in enumerate(["weekly", "daily", "picky", "tenant-a", "gone"]):
            await add_samples(db, 10 * n, 2, model=model)
        await db.execute("UPDATE model_lines SET last_tick_at = $1", datetime(2026, 1, 4, tzinfo=UTC))  # a Sunday
        tuesday = datetime(2026, 1, 6, 4, tzinfo=UTC)  # past Monday 02:00 and Tuesday 03:00
        closed = await tick_lines(db, Lines(settings), now=tuesday)
        assert sorted(w.model for w in closed) == ["daily", "tenant-a", "weekly"]  # picky: 2 samples < 5
        ticked = {r["model"]: r["last_tick_at"] for r in await db.fetch("SELECT model, last_tick_at FROM model_lines")}
        assert ticked["picky"] == tuesday and ticked["gone"] == datetime(2026, 1, 4, tzinfo=UTC)
        await add_samples(db, 100, 2, model="daily")
        again = await tick_lines(db, Lines(settings), now=datetime(2026, 1, 7, 3, tzinfo=UTC))  # Wednesday 03:00
        assert [w.model for w in again] == ["daily"]
    finally:
        await db.close()
