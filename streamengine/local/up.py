"""`streamengine up`: the whole loop on embedded defaults, for a first look and for demos.

Starts a tansu broker, an S3 server (SeaweedFS), PostgreSQL (the machine's, else an embedded one)
and a tiny model it creates, then the engine, a trainer worker, a serving-node subscriber and a demo
producer, and prints each release as the serving node swaps it in. The full log goes to the log folder;
the terminal shows only the ``[up]`` lines and warnings unless a log level was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path

from streamengine.config.keys import ensure_key_pair
from streamengine.config.settings import Settings
from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.local.demo import feedback_events
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, free_port
from streamengine.local.tinymodel import build_tiny_model
from streamengine.logs import log_to_file
from streamengine.serving.subscriber import Subscriber
from streamengine.serving.swappers import PeftSwapper
from streamengine.store import registry
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.produce import prepare, send

MODEL = "tiny-llama"


def _say(message: str) -> None:
    print(f"[up {time.strftime('%H:%M:%S')}] {message}", flush=True)


def up_settings(home: Path, kafka: str, pg_dsn: str, s3: SeaweedS3, model_dir: Path, window: int) -> Settings:
    """Settings of the local loop; releases are signed (Ed25519, a key pair kept in ``home``/keys)."""
    private_key, public_key = ensure_key_pair(home / "keys")
    return Settings(
        kafka={"bootstrap_servers": kafka, "session_timeout_s": 6, "rebalance_timeout_s": 6, "partitions": 2},
        database={"url": pg_dsn},
        storage={"endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key},
        model={"name": MODEL, "base": str(model_dir)},
        window={"max_samples": window},
        training={"epochs": 2, "batch_size": 8, "learning_rate": 2e-3, "max_length": 128},
        # The demo's tiny base cannot write prompts: Magpie would give noise (and take a minute). No self anchors.
        learning={"self_anchor": {"enabled": False}},
        worker={"work_dir": home / "work", "lease_s": 30, "heartbeat_s": 5, "poll_s": 0.5},
        api={"port": free_port()},
        metrics={"port": 0},
        serving={"download_dir": home / "serving", "public_key_file": public_key, "require_signature": True},
        signing={"private_key_file": private_key},
    )


def _route_output(logs: Path, quiet: bool) -> None:
    """Everything logged goes to ``logs/streamengine.log``; ``quiet`` keeps the terminal to warnings and
    turns off the Hugging Face progress bars (here and in the trainer's child processes, which inherit it)."""
    log_to_file(logs / "streamengine.log", quiet_console=quiet)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported


async def run_up(
    home: Path, events: int, window: int, exit_after: int, stop: asyncio.Event, *, quiet: bool = True
) -> None:
    logs = home / "logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    _route_output(logs, quiet)
    started = time.monotonic()
    _say(f"starting a broker, an S3 server and PostgreSQL (full logs in {logs})")
    with Tansu(log_dir=logs) as tansu, SeaweedS3(home / "s3", log_dir=logs) as s3:
        admin_dsn = await asyncio.to_thread(Postgres.connect_or_start, home / "pg", logs)
        database = f"streamengine_up_{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(create_database, admin_dsn, database)
        pg_dsn = admin_dsn.rsplit("/", 1)[0] + "/" + database
        model_dir = await asyncio.to_thread(build_tiny_model, home / "model")
        settings = up_settings(home, tansu.bootstrap, pg_dsn, s3, model_dir, window)
        _say(f"broker {tansu.bootstrap}, S3 {s3.endpoint}, PostgreSQL database {database}, model {model_dir}")
        try:
            await _run_loop(settings, events, exit_after, stop, started)
        finally:
            Postgres.stop_started()


async def _run_loop(settings: Settings, events: int, exit_after: int, stop: asyncio.Event, started: float) -> None:
    ready = asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop), name="engine")
    await asyncio.wait({engine, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if engine.done():
        engine.result()  # raises why the engine could not start
    _say(f"engine running; admin API at {settings.api.base_url()} (try: streamengine status)")
    db = await Database.connect(settings.database, migrate=False)
    worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="up-worker")
    releases = 0
    swapper = PeftSwapper(settings.model.base)

    async def on_swap(version: str) -> None:
        nonlocal releases
        releases += 1
        manifest = (await registry.get_adapter(db, MODEL, version)).manifest
        m, window = manifest.get("metrics") or {}, manifest.get("window") or {}
        _say(
            f"RELEASE {MODEL} {version}: {window.get('samples')} samples, loss {m.get('eval_loss_before', 0):.3f} -> "
            f"{m.get('eval_loss_after', 0):.3f}; serving node swapped it in "
            f"({(swapper.last_swap_s or 0) * 1000:.0f} ms), {time.monotonic() - started:.0f}s after start"
        )
        if exit_after and releases >= exit_after:
            stop.set()

    tasks = [asyncio.create_task(worker.run(stop), name="worker")]
    try:
        async with Subscriber(settings, swapper, MODEL, on_swap=on_swap):
            if events:
                prepared = prepare(feedback_events(events, MODEL), settings.kafka.max_record_bytes, keep_invalid=True)
                sent = await send(settings, settings.kafka.feedback_topic, prepared.records)
                _say(f"demo producer sent {sent} feedback events ({len(prepared.invalid)} malformed, for the DLQ)")
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(Exception):
            await engine
        await db.close()
    _say(f"stopped after {releases} releases")
