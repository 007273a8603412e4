"""The cron tick on real PostgreSQL: once with several replicas, once after downtime, new lines, time zones."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest

from streamengine import metrics
from streamengine.core.job_states import JOB_STATES
from streamengine.core.windows import Schedule
from streamengine.jobs.scheduler import refresh_gauges, run_scheduler, tick_once
from streamengine.store import windows
from streamengine.store.db import Database
from tests.engine_tools import add_samples

pytestmark = pytest.mark.integration

WEEKLY = Schedule("0 2 * * 1", "UTC")  # Monday 02:00
MODEL = "tiny-llama"


async def _set_last_tick(db: Database, moment: datetime) -> None:
    await db.execute("UPDATE model_lines SET last_tick_at = $2 WHERE model = $1", MODEL, moment)


async def _jobs(db: Database) -> list[tuple[str, int]]:
    return [(r["reason"], r["window_id"]) for r in await db.fetch("SELECT reason, window_id FROM jobs ORDER BY id")]


def _value(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


async def test_two_replicas_fire_one_tick_once(pg_dsn: str) -> None:
    from streamengine.config.settings import DatabaseSettings

    replicas = [await Database.connect(DatabaseSettings(url=pg_dsn)) for _ in range(2)]
    db = replicas[0]
    try:
        await add_samples(db, 0, 5)
        await _set_last_tick(db, datetime(2026, 1, 4, 12, tzinfo=UTC))  # a Sunday
        monday = datetime(2026, 1, 5, 2, 0, 1, tzinfo=UTC)
        results = await asyncio.gather(*(windows.tick(r, MODEL, WEEKLY, monday, 1) for r in replicas * 4))
        closed = [c for c in results if c is not None]
        assert len(closed) == 1 and closed[0].reason == "schedule" and closed[0].samples == 5
        assert await _jobs(db) == [("schedule", closed[0].window_id)]
        # the same tick seen again later that week does not fire
        assert await windows.tick(db, MODEL, WEEKLY, monday + timedelta(days=3), 1) is None
    finally:
        for r in replicas:
            await r.close()


async def test_two_scheduler_loops_on_one_database_fire_once(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings()
    replicas = [await Database.connect(settings.database) for _ in range(2)]
    db = replicas[0]
    closed_before = _value(metrics.WINDOWS_CLOSED, MODEL, "schedule")
    try:
        await add_samples(db, 0, 3)
        await db.execute("UPDATE model_lines SET last_tick_at = now() - interval '8 days'")
        stop = asyncio.Event()
        loops = [asyncio.create_task(run_scheduler(settings, r, stop, interval_s=0.05)) for r in replicas]
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*loops)
        assert [reason for reason, _ in await _jobs(db)] == ["schedule"]
        assert _value(metrics.WINDOWS_CLOSED, MODEL, "schedule") == closed_before + 1
        # the loops refreshed the gauges: no open window any more, one queued job
        assert _value(metrics.WINDOW_SAMPLES, MODEL) == 0
        assert _value(metrics.JOBS, "queued") == 1
        last = await db.fetchval("SELECT last_tick_at FROM model_lines")
        assert _value(metrics.NEXT_TICK, MODEL) == WEEKLY.next_after(last).timestamp()
    finally:
        for r in replicas:
            await r.close()


async def test_ticks_missed_while_down_fire_once_at_start(pg_dsn: str) -> None:
    from streamengine.config.settings import DatabaseSettings

    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        await add_samples(db, 0, 4)
        await _set_last_tick(db, datetime(2026, 1, 4, tzinfo=UTC))
        back_up = datetime(2026, 1, 27, 9, tzinfo=UTC)  # three Monday ticks were missed
        first = await tick_once(db, MODEL, WEEKLY, 1, now=back_up)
        assert first is not None and first.reason == "schedule"
        await add_samples(db, 100, 4)
        assert await tick_once(db, MODEL, WEEKLY, 1, now=back_up + timedelta(minutes=5)) is None
        assert await tick_once(db, MODEL, WEEKLY, 1, now=datetime(2026, 2, 2, 1, 59, tzinfo=UTC)) is None
        second = await tick_once(db, MODEL, WEEKLY, 1, now=datetime(2026, 2, 2, 2, 0, tzinfo=UTC))
        assert second is not None and second.samples == 4
        assert [reason for reason, _ in await _jobs(db)] == ["schedule", "schedule"]
    finally:
        await db.close()


async def test_a_new_model_line_waits_for_the_next_fire_time(pg_dsn: str) -> None:
    """last_tick_at starts at the line's creation: ticks before it existed are not 'missed'."""
    from streamengine.config.settings import DatabaseSettings

    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        await add_samples(db, 0, 2)  # creates the line now
        assert await tick_once(db, MODEL, WEEKLY, 1) is None
        created = await db.fetchval("SELECT created_at FROM model_lines WHERE model = $1", MODEL)
        assert await db.fetchval("SELECT last_tick_at FROM model_lines WHERE model = $1", MODEL) == created
        fire = WEEKLY.next_after(created)
        assert await tick_once(db, MODEL, WEEKLY, 1, now=fire - timedelta(seconds=1)) is None
        closed = await tick_once(db, MODEL, WEEKLY, 1, now=fire)
        assert closed is not None and closed.samples == 2
        # the scheduler of an engine whose line has no sample yet creates the line and fires nothing
        assert await tick_once(db, "other-line", WEEKLY, 1) is None
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE model = 'other-line'") == 0
    finally:
        await db.close()


async def test_a_tick_with_too_few_samples_is_consumed_and_the_window_stays_open(pg_dsn: str) -> None:
    from streamengine.config.settings import DatabaseSettings

    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    skipped_before = _value(metrics.TICKS, MODEL, "skipped")
    try:
        await add_samples(db, 0, 2)
        await _set_last_tick(db, datetime(2026, 1, 4, tzinfo=UTC))
        monday = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
        assert await tick_once(db, MODEL, WEEKLY, 5, now=monday) is None
        assert _value(metrics.TICKS, MODEL, "skipped") == skipped_before + 1
        assert await db.fetchval("SELECT last_tick_at FROM model_lines") == monday
        assert await db.fetchval("SELECT samples FROM windows WHERE state = 'open'") == 2
        assert await _jobs(db) == []
        await add_samples(db, 10, 3)
        closed = await tick_once(db, MODEL, WEEKLY, 5, now=monday + timedelta(days=7))
        assert closed is not None and closed.samples == 5
    finally:
        await db.close()


async def test_the_schedule_follows_the_configured_time_zone(pg_dsn: str) -> None:
    from streamengine.config.settings import DatabaseSettings

    new_york = Schedule("0 2 * * 1", "America/New_York")  # 02:00 EST = 07:00 UTC in January
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        await add_samples(db, 0, 1)
        await _set_last_tick(db, datetime(2026, 1, 4, tzinfo=UTC))
        assert await windows.tick(db, MODEL, new_york, datetime(2026, 1, 5, 6, 59, tzinfo=UTC), 1) is None
        closed = await windows.tick(db, MODEL, new_york, datetime(2026, 1, 5, 7, 0, tzinfo=UTC), 1)
        assert closed is not None
        assert new_york.next_after(datetime(2026, 1, 5, 7, 0, tzinfo=UTC)) == datetime(2026, 1, 12, 7, tzinfo=UTC)
    finally:
        await db.close()


async def test_manual_close_and_gauges_of_jobs_and_releases(pg_dsn: str) -> None:
    from streamengine.config.settings import DatabaseSettings

    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        assert await windows.close_now(db, MODEL, "manual") is None  # empty window: nothing to train
        await add_samples(db, 0, 3)
        closed = await windows.close_now(db, MODEL, "manual", min_samples=3)
        assert closed is not None and (closed.reason, closed.samples) == ("manual", 3)
        await add_samples(db, 10, 2)
        await db.execute("UPDATE jobs SET created_at = now() - interval '1 hour'")
        await refresh_gauges(db, MODEL, WEEKLY)
        assert _value(metrics.WINDOW_SAMPLES, MODEL) == 2
        assert _value(metrics.JOBS, "queued") == 1 and _value(metrics.JOBS, "failed") == 0
        assert 3590 < _value(metrics.JOB_AGE, "queued") < 3700
        assert _value(metrics.JOB_AGE, "running") == 0
    finally:
        await db.close()


async def test_the_jobs_gauge_reports_every_state(pg_dsn: str) -> None:
    """One job in each state the database allows (a Fisher job ends ``done``): each is counted."""
    from streamengine.config.settings import DatabaseSettings

    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        check = await db.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'jobs_state_check'"
        )
        assert sorted(re.findall(r"'(\w+)'", check)) == sorted(JOB_STATES)
        await add_samples(db, 0, 2)
        closed = await windows.close_now(db, MODEL, "manual")
        assert closed is not None
        await db.execute("UPDATE jobs SET state = $2 WHERE id = $1", closed.job_id, JOB_STATES[0])
        for state in JOB_STATES[1:]:
            await db.execute(
                "INSERT INTO jobs (model, window_id, reason, kind, state) VALUES ($1, $2, 'manual', 'fisher', $3)",
                MODEL,
                closed.window_id,
                state,
            )
        await refresh_gauges(db, MODEL, WEEKLY)
        assert {state: _value(metrics.JOBS, state) for state in JOB_STATES} == dict.fromkeys(JOB_STATES, 1)
        assert _value(metrics.JOBS, "done") == 1  # the state the gauge used to leave out
    finally:
        await db.close()
