"""Transactional outbox relay: publishes queued events to Kafka, in order, then marks them sent.

A transaction-scoped advisory lock makes one relay active at a time across replicas, which keeps the
per-model order of ``adapter.released`` records. A row is marked sent only after Kafka acknowledged
it; a crash in between republishes it (at-least-once; consumers ignore duplicate versions). A new row
wakes the relay at once (PostgreSQL NOTIFY, :mod:`streamengine.store.notify`); it also looks every
``interval_s``, in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from streamengine import metrics
from streamengine.contract.cloudevents import as_kafka
from streamengine.core.backoff import Backoff
from streamengine.store import outbox
from streamengine.store.db import Database
from streamengine.store.notify import OUTBOX, Wakeups
from streamengine.stream.ingest import RecordSender

log = logging.getLogger(__name__)


async def relay_once(db: Database, sender: RecordSender, limit: int = 100) -> int:
    """Publish up to ``limit`` pending rows; returns how many were published."""
    published = 0
    async with db.pool.acquire() as conn, conn.transaction():
        if not await outbox.lock_relay(conn):
            return 0
        for row in await outbox.pending(conn, limit):
            try:
                await sender.send_and_wait(
                    row.topic,
                    value=json.dumps(row.value, ensure_ascii=False).encode(),
                    key=row.key.encode(),
                    headers=as_kafka(row.headers),
                )
            except Exception as exc:
                metrics.OUTBOX_FAILURES.inc()
                await outbox.mark_failed(conn, row.id, f"{type(exc).__name__}: {exc}")
                log.warning("outbox row %d not published (%s); will retry", row.id, type(exc).__name__)
                break
            await outbox.mark_sent(conn, row.id)
            published += 1
        metrics.OUTBOX_BACKLOG.set(await outbox.backlog(conn))
    metrics.OUTBOX_PUBLISHED.inc(published)
    return published


async def run_relay(db: Database, sender: RecordSender, stop: asyncio.Event, interval_s: float = 0.5) -> None:
    """Relay until ``stop`` is set: at each new row, and every ``interval_s``; backing off while Kafka or
    PostgreSQL fail (2, 4, 8 ... intervals, at most 10 s)."""
    backoff, failures = Backoff(2 * interval_s, 10.0), 0
    wakeups = Wakeups(db, OUTBOX)
    try:
        while not stop.is_set():
            try:
                if await relay_once(db, sender):
                    continue  # more may be waiting
                failures = 0
            except Exception as exc:
                log.warning("outbox relay failed (%s: %s)", type(exc).__name__, exc)
                failures += 1
            if failures:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff.delay(failures))
            else:
                await wakeups.wait(interval_s, stop)
    finally:
        await wakeups.close()
