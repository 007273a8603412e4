"""`streamengine up`: the whole loop on embedded defaults, for a first look and for demos.

Starts a tansu broker, an S3 server (SeaweedFS), PostgreSQL (the machine's, else an embedded one)
and a tiny model pretrained in process on the demo's language (:mod:`streamengine.local.language`), then
the engine, a trainer worker, a serving-node subscriber and a demo producer whose corrections teach facts
the base gets wrong. After each release it prints the release and the serving node's answers to the demo's
questions, before (the base) and now. The full log goes to the log folder; the terminal shows only the
``[up]`` lines and warnings unless a log level was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamengine.config.keys import ensure_key_pair
from streamengine.config.settings import Settings
from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.local.demo import Quiz, feedback_events
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, free_port
from streamengine.local.language import build_pretrained, make_world
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
        training={"epochs": 5, "batch_size": 8, "learning_rate": 3e-3, "max_length": 128},
        # The demo's tiny base cannot write prompts: Magpie would give noise (and take a minute). No self anchors.
        learning={"self_anchor": {"enabled": False}},
        worker={"work_dir": home / "work", "lease_s": 30, "heartbeat_s": 5, "poll_s": 0.5},
        api={"port": free_port()},
        metrics={"port": 0},
        serving={"download_dir": home / "serving", "public_key_file": public_key, "require_signature": True},
        signing={"private_key_file": private_key},
        # One serving node and feedback that names no version: a canary would have nothing to be judged
        # against and would wait out rollout.max_duration, holding every later job. Every release at once.
        rollout={"canary_fraction": 0.0},
    )


def _route_output(logs: Path, quiet: bool) -> None:
    """Everything logged goes to ``logs/streamengine.log``; ``quiet`` keeps the terminal to warnings and
    turns off the Hugging Face progress bars (here and in the trainer's child processes, which inherit it)."""
    log_to_file(logs / "streamengine.log", quiet_console=quiet)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported


def _serving_node(home: Path, quiz: Quiz) -> tuple[Path, PeftSwapper]:
    """The demo's base (pretrained, or cached), loaded by the serving node, with the base's answers to the quiz
    and peft imported (the first swap needs it): all while the services start. The tiny model runs on one
    thread in this process, as fast as on more, which on a busy machine wait for each other (the trainer's
    child processes choose their own)."""
    import torch

    torch.set_num_threads(1)
    base = build_pretrained(home / "model", quiz.seed)
    swapper = PeftSwapper(str(base))
    quiz.before = quiz.ask(swapper)
    importlib.import_module("peft")
    return base, swapper


View = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]
"""A live view of the running engine (`streamengine top`'s), shown until up stops; it may set the stop event."""


@dataclass(frozen=True)
class UpOptions:
    events: int = 400  # demo feedback events to produce
    window: int = 64  # samples per training window
    exit_after: int = 0  # stop after this many releases (0: at the stop event only)
    seed: int = 0  # of the demo's language, base and feedback
    quiet: bool = True  # the terminal shows only [up] lines and warnings
    view: View | None = None


async def run_up(home: Path, options: UpOptions, stop: asyncio.Event) -> None:
    logs = home / "logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    _route_output(logs, options.quiet)
    started = time.monotonic()
    _say(f"starting a broker, an S3 server and PostgreSQL; pretraining a tiny model (full logs in {logs})")
    quiz = Quiz(make_world(options.seed), options.seed)
    serving_node = asyncio.create_task(asyncio.to_thread(_serving_node, home, quiz))
    with Tansu(log_dir=logs) as tansu, SeaweedS3(home / "s3", log_dir=logs) as s3:
        admin_dsn = await asyncio.to_thread(Postgres.connect_or_start, home / "pg", logs)
        database = f"streamengine_up_{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(create_database, admin_dsn, database)
        pg_dsn = admin_dsn.rsplit("/", 1)[0] + "/" + database
        model_dir, swapper = await serving_node
        settings = up_settings(home, tansu.bootstrap, pg_dsn, s3, model_dir, options.window)
        _say(
            f"broker {tansu.bootstrap}, S3 {s3.endpoint}, PostgreSQL database {database}, model {model_dir} "
            f"(pretrained on the demo's language: the capitals of {len(quiz.world.capitals)} made-up countries)"
        )
        try:
            await _run_loop(settings, options, _Node(swapper, quiz, started), stop)
        finally:
            Postgres.stop_started()


async def _start_engine(settings: Settings, stop: asyncio.Event) -> asyncio.Task[None]:
    ready = asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop), name="engine")
    await asyncio.wait({engine, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if engine.done():
        engine.result()  # raises why the engine could not start
    _say(f"engine running; admin API at {settings.api.base_url()} (try: streamengine top)")
    return engine


@dataclass
class _Node:
    """The demo's serving node: its model, the questions it answers after each release, the releases seen."""

    swapper: PeftSwapper
    quiz: Quiz
    started: float
    releases: int = 0

    async def on_swap(self, db: Database, version: str) -> None:
        self.releases += 1
        manifest = (await registry.get_adapter(db, MODEL, version)).manifest
        m, window = manifest.get("metrics") or {}, manifest.get("window") or {}
        _say(
            f"RELEASE {MODEL} {version}: {window.get('samples')} samples, loss {m.get('eval_loss_before', 0):.3f} -> "
            f"{m.get('eval_loss_after', 0):.3f}; serving node swapped it in "
            f"({(self.swapper.last_swap_s or 0) * 1000:.0f} ms), {time.monotonic() - self.started:.0f}s after start"
        )
        for line in self.quiz.lines(await asyncio.to_thread(self.quiz.ask, self.swapper)):
            _say(line)


async def _run_loop(settings: Settings, options: UpOptions, node: _Node, stop: asyncio.Event) -> None:
    engine = await _start_engine(settings, stop)
    db = await Database.connect(settings.database, migrate=False)
    worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="up-worker")

    async def on_swap(version: str) -> None:
        await node.on_swap(db, version)
        if options.exit_after and node.releases >= options.exit_after:
            stop.set()

    tasks = [asyncio.create_task(worker.run(stop), name="worker")]
    if options.view is not None:
        tasks.append(asyncio.create_task(options.view(settings, stop), name="view"))
    try:
        if options.events:
            await _produce(settings, options.events, node.quiz)
        async with Subscriber(settings, node.swapper, MODEL, on_swap=on_swap):
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(Exception):
            await engine
        await db.close()
    _say(f"stopped after {node.releases} releases")


async def _produce(settings: Settings, events: int, quiz: Quiz) -> None:
    prepared = prepare(feedback_events(events, MODEL, quiz.seed), settings.kafka.max_record_bytes, keep_invalid=True)
    sent = await send(settings, settings.kafka.feedback_topic, prepared.records)
    _say(
        f"demo producer sent {sent} feedback events ({len(prepared.invalid)} malformed, for the DLQ); its corrections "
        f"teach the {len(quiz.world.moved)} capitals that moved, which the base gets wrong"
    )
