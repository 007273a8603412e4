"""The scheduler loop of `streamengine run`: the cron tick, the gauges read from PostgreSQL and retention.

Windows also close on threshold during ingest; this loop adds the time-based close. Whether a tick
fires is decided in PostgreSQL, on PostgreSQL's clock (see :func:`streamengine.store.windows.tick`):
the model line row is locked and ``last_tick_at`` moved, so with any number of replicas one tick
fires once, and a tick missed while everything was down fires once at the next start.

Semantics of ``model_lines.last_tick_at``: a model line starts with ``last_tick_at`` = its creation
(first sample or first scheduler pass), so a brand-new line waits for the next fire time instead of
firing at once for ticks that passed before it existed. A tick that finds fewer than
``window.min_samples`` samples is consumed anyway: the window stays open until the next tick (or its
threshold, or a manual train).

Every model line ticks on its own schedule (``models:`` entries may override ``window.*``): the lines named in
the settings, and the lines a pattern matches once they have an open window (:func:`tick_lines`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from datetime import datetime

from streamengine import metrics
from streamengine.config.lines import Lines
from streamengine.config.settings import PrivacySettings, Settings
from streamengine.core.job_states import ACTIVE_STATES, JOB_STATES
from streamengine.core.windows import Schedule
from streamengine.store import job_queue, privacy, registry, windows
from streamengine.store.db import Database
from streamengine.store.windows import ClosedWindow

log = logging.getLogger(__name__)


def schedule_of(settings: Settings) -> Schedule:
    """The configured tick; a bad cron or time zone is a ConfigError naming the setting."""
    return _schedule(settings.window.schedule, settings.window.timezone)


@functools.lru_cache(maxsize=256)
def _schedule(cron: str, timezone: str) -> Schedule:
    return Schedule(cron, timezone)


async def tick_lines(db: Database, lines: Lines, now: datetime | None = None) -> list[ClosedWindow]:
    """The tick of every line, each on its own schedule and ``window.min_samples``: every line named in the
    settings, and every line a pattern matches that has an open window. Only the lines whose schedule is due
    since their last tick (read for all lines at once) take a transaction; each line's tick gauges are set from
    what was read."""
    if now is None:
        now = await windows.database_now(db)
    named = lines.names()
    opened = [model for model in sorted(await windows.open_window_fill(db)) if model not in named]
    last = await windows.last_ticks(db)
    closed = []
    for model in [*named, *filter(lines.matches, opened)]:
        line = lines.for_line(model)
        schedule = schedule_of(line)
        if (previous := last.get(model)) is not None:
            following = schedule.next_after(previous)
            metrics.LAST_TICK.labels(model).set(previous.timestamp())
            metrics.NEXT_TICK.labels(model).set(following.timestamp())
            if following > now:  # not due (Schedule.is_due, with the next fire time kept for the gauge)
                continue
        if (window := await tick_once(db, model, schedule, line.window.min_samples, now)) is not None:
            closed.append(window)
    return closed


async def tick_once(
    db: Database, model: str, schedule: Schedule, min_samples: int, now: datetime | None = None
) -> ClosedWindow | None:
    """Run the tick decision once (``now`` defaults to PostgreSQL's clock); count what happened."""
    if now is None:
        now = await windows.database_now(db)
    closed = await windows.tick(db, model, schedule, now, min_samples)
    if closed is not None:
        metrics.TICKS.labels(model, "closed").inc()
        metrics.WINDOWS_CLOSED.labels(closed.model, closed.reason).inc()
        log.info(
            "tick closed window %d of %s (%d samples, weight %.2f) -> job %d",
            closed.window_id,
            model,
            closed.samples,
            closed.weight,
            closed.job_id,
        )
    elif await windows.last_tick(db, model) == now:
        metrics.TICKS.labels(model, "skipped").inc()
        log.info("tick for %s: the open window holds fewer than %d samples; kept open", model, min_samples)
    return closed


async def refresh_gauges(db: Database, model: str, schedule: Schedule) -> None:
    """Set the gauges that mirror PostgreSQL: open windows, jobs, last release, ticks."""
    fill = await windows.open_window_fill(db)
    for name in {model, *fill}:
        samples, weight = fill.get(name, (0, 0.0))
        metrics.WINDOW_SAMPLES.labels(name).set(samples)
        metrics.WINDOW_WEIGHT.labels(name).set(weight)
    by_state = await job_queue.state_summary(db)
    for state in JOB_STATES:
        metrics.JOBS.labels(state).set(by_state[state].count if state in by_state else 0)
    for state in ACTIVE_STATES:
        metrics.JOB_AGE.labels(state).set(by_state[state].oldest_age_s if state in by_state else 0.0)
    for name, released_at in (await registry.last_release_times(db)).items():
        metrics.LAST_RELEASE.labels(name).set(released_at)
    last = await windows.last_tick(db, model)
    if last is not None:
        metrics.LAST_TICK.labels(model).set(last.timestamp())
        metrics.NEXT_TICK.labels(model).set(schedule.next_after(last).timestamp())


async def expire_once(db: Database, settings: PrivacySettings) -> int:
    """One retention pass when ``privacy.retention_days`` is set (see :mod:`streamengine.store.privacy`)."""
    if settings.retention_days is None:
        return 0
    deleted = await privacy.expire(db, settings.retention_days, settings.retention_batch_size)
    if deleted:
        metrics.SAMPLES_EXPIRED.inc(deleted)
        log.info("retention: %d samples stored over %d days ago deleted", deleted, settings.retention_days)
    return deleted


async def run_scheduler(settings: Settings, db: Database, stop: asyncio.Event, interval_s: float = 5.0) -> None:
    """Tick (and refresh the gauges) every ``interval_s`` until ``stop`` is set; failures are logged and retried."""
    schedule, lines = schedule_of(settings), Lines(settings)
    model = settings.model.name
    while not stop.is_set():
        try:
            await tick_lines(db, lines)
            await refresh_gauges(db, model, schedule)
            await expire_once(db, settings.privacy)
        except Exception as exc:
            log.warning("scheduler: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
