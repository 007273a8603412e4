"""The scheduler loop of `streamengine run`: the cron tick and the window/job gauges.

Windows also close on threshold during ingest; this loop adds the time-based close. Whether a tick
fires is decided in PostgreSQL (see :func:`streamengine.store.windows.tick`), so replicas agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from streamengine import metrics
from streamengine.config import Settings
from streamengine.core.windows import Schedule
from streamengine.store import windows
from streamengine.store.db import Database

log = logging.getLogger(__name__)


async def refresh_gauges(db: Database) -> None:
    for row in await db.fetch("SELECT model, samples, weight FROM windows WHERE state = 'open'"):
        metrics.WINDOW_SAMPLES.labels(row["model"]).set(row["samples"])
        metrics.WINDOW_WEIGHT.labels(row["model"]).set(row["weight"])
    counts = {r["state"]: r["n"] for r in await db.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")}
    for state in ("queued", "running", "released", "rejected", "failed"):
        metrics.JOBS.labels(state).set(counts.get(state, 0))


async def run_scheduler(settings: Settings, db: Database, stop: asyncio.Event, interval_s: float = 5.0) -> None:
    schedule = Schedule(settings.window.schedule, settings.window.timezone)
    model = settings.model.name
    while not stop.is_set():
        try:
            closed = await windows.tick(db, model, schedule, datetime.now(UTC), settings.window.min_samples)
            if closed:
                metrics.WINDOWS_CLOSED.labels(closed.model, closed.reason).inc()
                log.info("tick closed window %d of %s -> job %d", closed.window_id, model, closed.job_id)
            await refresh_gauges(db)
        except Exception as exc:
            log.warning("scheduler: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
