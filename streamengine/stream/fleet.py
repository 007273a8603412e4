"""The engine's side of ``adapter.status``: store what every serving node reports (:class:`NodeStatus`) in
PostgreSQL (``fleet_nodes``, :mod:`streamengine.store.fleet`), and the fleet gauges.

One consumer group (``<kafka.group_id>-fleet``) shares the topic among the engine's replicas. Offsets are
committed after the records are stored, so a crash stores a record twice at worst (the store keeps the
newest heartbeat, so a replay changes nothing). A record that is not a NodeStatus of the key it is sent
under is logged on one line, counted (``streamengine_fleet_status_records_total{outcome="invalid"}``) and
skipped. A tombstone (a node that stopped cleanly) removes the node; one that dies goes silent instead.
Kafka or PostgreSQL failing restarts the consumer after a pause, from the last committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from streamengine import metrics
from streamengine.config.settings import Settings
from streamengine.contract.events import NodeStatus, status_key
from streamengine.core.backoff import Backoff
from streamengine.store import fleet
from streamengine.store.db import Database
from streamengine.stream import security

log = logging.getLogger(__name__)

_RETRY = Backoff(1.0, 30.0)


def decode(record: Any) -> NodeStatus:
    """The NodeStatus a record carries; ValueError naming what is wrong (its key must be ``<model>/<node_id>``)."""
    try:
        status = NodeStatus.model_validate(json.loads(record.value))
    except (ValueError, TypeError, ValidationError) as exc:
        raise ValueError(str(exc).splitlines()[0][:300]) from None
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    if key != status_key(status.model, status.node_id):
        raise ValueError(f"key {key!r} is not {status_key(status.model, status.node_id)!r} (model/node_id)")
    return status


async def store_batch(db: Database, records: list[Any]) -> int:
    """Store the NodeStatus records among ``records``; returns how many were stored (invalid ones are skipped)."""
    stored = 0
    for record in records:
        if record.value is None:  # a node that stopped cleanly left the fleet
            model, _, node_id = (record.key or b"").decode("utf-8", "replace").rpartition("/")
            if model and node_id:
                await fleet.forget(db, model, node_id)
            continue
        try:
            status = decode(record)
        except ValueError as exc:
            metrics.FLEET_STATUS_RECORDS.labels("invalid").inc()
            log.error("skipping status record %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            continue
        await fleet.record_status(db, status)
        stored += 1
    metrics.FLEET_STATUS_RECORDS.labels("stored").inc(stored)
    return stored


async def run_status_consumer(settings: Settings, db: Database, stop: asyncio.Event, poll_ms: int = 500) -> None:
    """Store ``adapter.status`` records until ``stop`` is set; never ends on a failure (it pauses and reconnects)."""
    failures = 0
    while not stop.is_set():
        consumer: AIOKafkaConsumer | None = None
        try:
            consumer = await _open(settings)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=poll_ms)
                records = [r for tp in sorted(batch) for r in batch[tp]]
                if records:
                    await store_batch(db, records)
                    await consumer.commit()
                failures = 0
        except Exception as exc:
            failures += 1
            log.warning(
                "reading %s failed (%s: %s); again shortly", settings.kafka.status_topic, type(exc).__name__, exc
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _RETRY.delay(failures))
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()


async def _open(settings: Settings) -> AIOKafkaConsumer:
    kafka = settings.kafka
    consumer = AIOKafkaConsumer(
        **security.client_options(kafka),
        group_id=f"{kafka.group_id}-fleet",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(kafka.session_timeout_s * 1000),
        heartbeat_interval_ms=int(min(3.0, kafka.session_timeout_s / 3) * 1000),
        rebalance_timeout_ms=int(kafka.rebalance_timeout_s * 1000),
    )
    consumer.subscribe([kafka.status_topic])
    await security.start(consumer, kafka)
    return consumer


async def refresh_gauges(db: Database, timeout_s: float) -> None:
    """Set the fleet gauges from ``fleet_nodes``: live nodes by line, version, stage and state; failed live
    nodes by the version they could not load; silent nodes by line."""
    nodes = await fleet.nodes(db, timeout_s)
    live = Counter((n.model, n.version or "none", n.stage, n.state) for n in nodes if not n.silent)
    failed = Counter((n.model, n.target_version or "none") for n in nodes if not n.silent and n.state == "failed")
    silent = Counter(n.model for n in nodes if n.silent)
    for gauge, counts in ((metrics.FLEET_NODES, live), (metrics.FLEET_FAILED, failed)):
        gauge.clear()
        for labels, count in counts.items():
            gauge.labels(*labels).set(count)
    metrics.FLEET_SILENT.clear()
    for model in {n.model for n in nodes}:
        metrics.FLEET_SILENT.labels(model).set(silent[model])
