"""Helpers for tests of the running engine: samples straight into PostgreSQL, an engine in this event loop,
fake registry rows (adapters that exist only in the database, for API and CLI tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from streamengine.config.settings import Settings
from streamengine.contract.events import FeedbackEvent
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.engine import run_engine
from streamengine.store import windows
from streamengine.store.db import Database


async def add_samples(
    db: Database, start: int, count: int, model: str = "tiny-llama", max_samples: int = 10_000
) -> windows.BatchOutcome:
    """``count`` thumbs-up samples (event ids ``s-<start>`` ...) written as ingest writes them."""
    policy = SamplePolicy(kind_weights={"thumbs_up": 1.0})
    rows = []
    for i in range(start, start + count):
        event = FeedbackEvent(event_id=f"s-{i}", model=model, prompt=f"Q{i}?", response=f"A{i}", kind="thumbs_up")
        rows.append((to_sample(event, policy), 0, i))
    return await windows.write_batch(db, rows, WindowPolicy(max_samples=max_samples))


@contextlib.asynccontextmanager
async def engine_running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """``run_engine`` in this loop; yields an HTTP client of its admin API (with the token, when set)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        stop.set()
        await task  # raises the engine's error
        raise AssertionError("engine did not start within 60 s")
    token = settings.api.token
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    try:
        async with httpx.AsyncClient(base_url=settings.api.base_url(), headers=headers, timeout=30) as client:
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def health_ok(url: str) -> bool:
    """GET ``url``/health answers 200 (False while the engine is not up)."""
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(url + "/health")).status_code == 200
        except httpx.TransportError:
            return False


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    """One sample of the engine's /metrics, or None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def add_adapter(db: Database, version: str, model: str = "tiny-llama", **manifest: Any) -> None:
    """A registry row (no files in S3): enough for list, info, deploy and rollback."""
    major, minor = (int(x) for x in version[1:].split("."))
    await db.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", model)
    body = {
        "model": model,
        "version": version,
        "parent_version": None,
        "base_model": "tiny",
        "uri": f"s3://bucket/{model}/{version}/",
        "files": {"adapter_model.safetensors": "0" * 64},
        "size_bytes": 2048,
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj"]},
        "ewc_lambda": 500.0,
        "window": {"id": 1, "samples": 16, "weight": 16.0},
        "metrics": {"train_loss": 1.0, "eval_loss_before": 2.0, "eval_loss_after": 1.5},
        "reason": "threshold",
        "created_at": "2026-01-05T02:00:00+00:00",
        **manifest,
    }
    await db.execute(
        "INSERT INTO adapters (model, version, major, minor, parent_version, uri, size_bytes, manifest)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        model,
        version,
        major,
        minor,
        body["parent_version"],
        body["uri"],
        body["size_bytes"],
        body,
    )


async def eventually(predicate: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


def module_settings(services: Any, dsn: str, workdir: Any, **overrides: Any) -> Settings:
    """Like the ``make_settings`` fixture, for a module-scoped engine (own topics, group, bucket, ports)."""
    import uuid

    from streamengine.config.settings import load_settings
    from streamengine.local.embedded import free_port

    suffix = uuid.uuid4().hex[:10]
    fields: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": services.kafka_bootstrap,
            "feedback_topic": f"feedback.events.{suffix}",
            "dlq_topic": f"feedback.events.dlq.{suffix}",
            "released_topic": f"adapter.released.{suffix}",
            "group_id": f"streamengine-ingest-{suffix}",
            "session_timeout_s": 6.0,
            "rebalance_timeout_s": 6.0,
            "partitions": 2,
        },
        "database": {"url": dsn},
        "storage": {
            "endpoint": services.s3_endpoint,
            "access_key": services.s3_access_key,
            "secret_key": services.s3_secret_key,
            "bucket": f"se-test-{suffix}",
        },
        "worker": {"work_dir": workdir / "work"},
        "serving": {"download_dir": workdir / "adapters"},
        "api": {"port": free_port()},
        "metrics": {"port": free_port()},
    }
    for key, value in overrides.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) and key in fields else value
    return load_settings(**fields)
