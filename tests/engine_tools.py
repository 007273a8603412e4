"""Helpers for tests of the running engine: samples straight into PostgreSQL, an engine or an ingest replica
in this event loop, settings for the worker on the tiny model, fake registry rows (adapters that exist only in
the database, for API and CLI tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from streamengine.config.settings import Settings
from streamengine.contract.events import FeedbackEvent
from streamengine.core.samples import Sample, SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.engine import run_engine
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.stream.app import build_app
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.producer import start_producer

# One quick epoch on the tiny model: enough for a release whose eval loss went down.
TRAINING = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 64}


def worker_settings(make_settings: Callable[..., Settings], tiny_model: Path, **extra: Any) -> Settings:
    """Settings for a trainer worker on the tiny model: windows of 16 samples, :data:`TRAINING` unless told."""
    extra.setdefault("training", TRAINING)
    return make_settings(model={"base": str(tiny_model)}, window={"max_samples": 16}, **extra)


async def add_samples(
    db: Database,
    start: int,
    count: int,
    model: str = "tiny-llama",
    max_samples: int = 10_000,
    prompts: int | None = None,
) -> windows.BatchOutcome:
    """``count`` thumbs-up samples (event ids ``s-<start>`` ...) written as ingest writes them; each its own
    question, or the questions repeat every ``prompts`` samples."""
    policy = SamplePolicy(kind_weights={"thumbs_up": 1.0})
    rows: list[tuple[Sample, int | None, int | None]] = []
    for i in range(start, start + count):
        n = i if prompts is None else i % prompts
        event = FeedbackEvent(event_id=f"s-{i}", model=model, prompt=f"Q{n}?", response=f"A{n}", kind="thumbs_up")
        rows.append((to_sample(event, policy), 0, i))
    return await windows.write_batch(db, rows, WindowPolicy(max_samples=max_samples))


async def fill_window(db: Database, start: int, count: int = 16) -> windows.BatchOutcome:
    """One closed window of ``count`` samples over four questions: data the tiny model learns in one epoch."""
    return await add_samples(db, start, count, max_samples=count, prompts=4)


async def fill_long_window(db: Database, start: int, count: int, model: str = "tiny-llama") -> windows.BatchOutcome:
    """``count`` samples of ~250 tokens (byte tokenizer) closing one window (a batch of them fills memory)."""
    policy = SamplePolicy(kind_weights={"thumbs_up": 1.0})
    rows: list[tuple[Sample, int | None, int | None]] = []
    for i in range(start, start + count):
        event = FeedbackEvent(
            event_id=f"long-{i}", model=model, prompt=f"Q{i}? " + "x" * 120, response=f"A{i} " + "y" * 120,
            kind="thumbs_up", user_id=f"u{i % 50}",
        )  # fmt: skip
        rows.append((to_sample(event, policy), 0, i))
    return await windows.write_batch(db, rows, WindowPolicy(max_samples=count))


@contextlib.asynccontextmanager
async def ingest_replica(settings: Settings, datadir: Path) -> AsyncIterator[Database]:
    """One ingest replica in this loop: consumer + pipeline, as `streamengine run` wires them; yields its database."""
    db = await Database.connect(settings.database)
    producer = await start_producer(settings.kafka)
    app = build_app(settings, IngestPipeline(settings, db, producer), datadir)
    await app.start()
    try:
        yield db
    finally:
        await app.stop()
        await producer.stop()
        await db.close()


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
