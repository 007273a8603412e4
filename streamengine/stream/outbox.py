"""Transactional outbox relay: publishes queued events to Kafka, in order, then marks them sent.

A transaction-scoped advisory lock makes one relay active at a time across replicas, which keeps the
per-model order of ``adapter.released`` records. A row is marked sent only after Kafka acknowledged
it; a crash in between republishes it (at-least-once; consumers ignore duplicate versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from streamengine import metrics
from streamengine.contract.cloudevents import as_kafka
from streamengine.core.backoff import Backoff
from streamengine.store.db import Database
from streamengine.stream.ingest import RecordSender

log = logging.getLogger(__name__)

_RELAY_LOCK = 0x5E_0002


async def relay_once(db: Database, sender: RecordSender, limit: int = 100) -> int:
    """Publish up to ``limit`` pending rows; returns how many were published."""
    published = 0
    async with db.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK):
            return 0
        rows = await conn.fetch("SELECT * FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1", limit)
        for row in rows:
            try:
                await sender.send_and_wait(
                    row["topic"],
                    value=json.dumps(row["value"], ensure_ascii=False).encode(),
                    key=row["key"].encode(),
                    headers=as_kafka(row["headers"]),
                )
            except Exception as exc:
                metrics.OUTBOX_FAILURES.inc()
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                    row["id"],
                    f"{type(exc).__name__}: {exc}"[:500],
                )
                log.warning("outbox row %d not published (%s); will retry", row["id"], type(exc).__name__)
                break
            await conn.execute("UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = $1", row["id"])
            published += 1
        backlog = await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    metrics.OUTBOX_BACKLOG.set(backlog)
    metrics.OUTBOX_PUBLISHED.inc(published)
    return published


async def run_relay(db: Database, sender: RecordSender, stop: asyncio.Event, interval_s: float = 0.5) -> None:
    """Relay until ``stop`` is set, backing off while Kafka or PostgreSQL fail (2, 4, 8 ... intervals, at most 10 s)."""
    backoff, failures = Backoff(2 * interval_s, 10.0), 0
    while not stop.is_set():
        try:
            if await relay_once(db, sender):
                continue  # more may be waiting
            failures = 0
        except Exception as exc:
            log.warning("outbox relay failed (%s: %s)", type(exc).__name__, exc)
            failures += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff.delay(failures) if failures else interval_s)
