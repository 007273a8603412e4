"""`streamengine up`: the whole loop on embedded defaults, for a first look and for demos.

Starts a tansu broker, an S3 server (SeaweedFS), PostgreSQL (the machine's, else an embedded one)
and a tiny model pretrained in process on the demo's language (:mod:`streamengine.local.language`), then
the engine, a trainer worker, a demo fleet of two serving nodes (:data:`NODES`) and a demo producer whose
corrections teach facts the base gets wrong. After the first release, each new version goes on trial on one
node while demo users (:class:`~streamengine.local.demo.LiveUsers`) ask both and send feedback naming the
version that answered; the engine judges the trial on it. `up` prints each version as a node swaps it in,
with its answers to the demo's questions, before (the base) and now, and each trial's progress and decision.
The full log goes to the log folder; the terminal shows only the
``[up]`` lines and warnings unless a log level was asked for.

With ``--lines N`` (N > 1) the engine serves N model lines of the same base (``models:`` entries: tiny-llama,
tiny-llama-b, ...), the demo producer spreads its events over them, each line taught capitals of its own
(:meth:`~streamengine.local.language.World.for_line`), and both nodes follow every line; each release goes to
both nodes at once: trials (and the demo users who judge them) run with one line only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamengine.config.keys import ensure_key_pair
from streamengine.config.settings import Settings
from streamengine.core.rollout import canary_nodes
from streamengine.engine import run_engine
from streamengine.errors import ConfigError
from streamengine.jobs.worker import Worker
from streamengine.local.demo import LiveUsers, Quiz, feedback_events
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, drop_database, free_port
from streamengine.local.language import MAX_LINES, build_pretrained, make_world
from streamengine.logs import log_to_file
from streamengine.serving.subscriber import Subscriber
from streamengine.serving.swappers import PeftSwapper
from streamengine.store import registry, rollouts
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.produce import prepare, send

MODEL = "tiny-llama"
log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"[up {time.strftime('%H:%M:%S')}] {message}", flush=True)


# The demo fleet: two serving nodes of the line. canary_nodes(NODES, MODEL, CANARY_FRACTION) == ["node-a"]: node-a
# runs each new version on trial, node-b stays on production until the engine decides.
NODES = ("node-a", "node-b")
CANARY_FRACTION = 0.5
# The demo's judgement, sized so a decision comes within seconds of live feedback: 100 events on each side (not
# 200), a margin of 0.05 (not 0.02: with no negative answer on either side, 0.02 needs about 120 events for
# P >= 0.95), and 50 users who may each hold 2% of a side (the default share, 0.5%, wants 200 users).
DEMO_ROLLOUT: dict[str, Any] = {
    "canary_fraction": CANARY_FRACTION,
    "min_events": 100,
    "max_regression": 0.05,
    "max_user_share": 0.02,
}
LIVE_USERS = 50
LIVE_EVENTS_PER_S = 20  # per node, while a version is served


def line_names(count: int) -> list[str]:
    """The demo's ``count`` model lines: :data:`MODEL`, then ``tiny-llama-b``, ``tiny-llama-c``, ..."""
    if not 1 <= count <= MAX_LINES:
        raise ConfigError(f"--lines: {count} lines; the demo's world has room for 1 to {MAX_LINES}")
    return [MODEL] + [f"{MODEL}-{chr(ord('a') + index)}" for index in range(1, count)]


def up_settings(
    home: Path,
    kafka: str,
    pg_dsn: str,
    s3: SeaweedS3,
    model_dir: Path,
    window: int,
    fleet: bool = False,
    lines: list[str] | None = None,
) -> Settings:
    """Settings of the local loop; releases are signed (Ed25519, a key pair kept in ``home``/keys). With ``fleet``
    (`up`'s demo fleet of :data:`NODES`) and one line, new versions go on trial first, judged as
    :data:`DEMO_ROLLOUT`; else every release goes to every node at once. Several ``lines``: ``models:`` entries."""
    private_key, public_key = ensure_key_pair(home / "keys")
    several = lines is not None and len(lines) > 1
    return Settings(
        kafka={"bootstrap_servers": kafka, "session_timeout_s": 6, "rebalance_timeout_s": 6, "partitions": 2},
        database={"url": pg_dsn},
        storage={"endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key},
        model={"name": MODEL, "base": str(model_dir)},
        models=[{"name": line} for line in lines or []] if several else [],
        window={"max_samples": window},
        training={"epochs": 5, "batch_size": 8, "learning_rate": 3e-3, "max_length": 128},
        # The demo's tiny base cannot write prompts: Magpie would give noise (and take a minute). No self anchors.
        learning={"self_anchor": {"enabled": False}},
        worker={"work_dir": home / "work", "lease_s": 30, "heartbeat_s": 5, "poll_s": 0.5},
        api={"port": free_port()},
        metrics={"port": 0},
        serving={"download_dir": home / "serving", "public_key_file": public_key, "require_signature": True},
        signing={"private_key_file": private_key},
        # Without a fleet (one node, feedback naming no version) a canary would have nothing to be judged against
        # and would wait out rollout.max_duration, holding every later job: every release at once.
        rollout=DEMO_ROLLOUT if fleet and not several else {"canary_fraction": 0.0},
    )


def node_settings(settings: Settings, node_id: str) -> Settings:
    """``settings`` of one serving node of the demo fleet: its own id and download folder."""
    serving = settings.serving.model_copy(
        update={"node_id": node_id, "download_dir": settings.serving.download_dir / node_id}
    )
    return settings.model_copy(update={"serving": serving})


def _route_output(logs: Path, quiet: bool) -> None:
    """Everything logged goes to ``logs/streamengine.log``; ``quiet`` keeps the terminal to warnings and
    turns off the Hugging Face progress bars (here and in the trainer's child processes, which inherit it)."""
    log_to_file(logs / "streamengine.log", quiet_console=quiet)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported


def _serving_nodes(home: Path, quizzes: dict[str, Quiz]) -> tuple[Path, dict[str, PeftSwapper]]:
    """The demo's base (pretrained, or cached), loaded by each node of the demo fleet, with the base's answers
    to each line's quiz and peft imported (the first swap needs it): all while the services start. The tiny model runs
    on one thread in this process, as fast as on more, which on a busy machine wait for each other (the
    trainer's child processes choose their own)."""
    import torch

    torch.set_num_threads(1)
    base = build_pretrained(home / "model", next(iter(quizzes.values())).seed)
    swappers = {node_id: PeftSwapper(str(base)) for node_id in NODES}
    for quiz in quizzes.values():
        quiz.before = quiz.ask(swappers[NODES[0]])
    importlib.import_module("peft")
    return base, swappers


View = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]
"""A live view of the running engine (`streamengine top`'s), shown until up stops; it may set the stop event."""


@dataclass(frozen=True)
class UpOptions:
    events: int = 400  # demo feedback events to produce
    window: int = 64  # samples per training window
    exit_after: int = 0  # stop after this many releases of each line (0: at the stop event only)
    seed: int = 0  # of the demo's language, base and feedback
    quiet: bool = True  # the terminal shows only [up] lines and warnings
    view: View | None = None
    lines: int = 1  # model lines of the demo's base (canary trials with 1 only)
    keep_database: bool = False  # keep the demo's PostgreSQL database at exit (else dropped)


async def run_up(home: Path, options: UpOptions, stop: asyncio.Event) -> None:
    lines = line_names(options.lines)
    logs = home / "logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    _route_output(logs, options.quiet)
    started = time.monotonic()
    _say(f"starting a broker, an S3 server and PostgreSQL; pretraining a tiny model (full logs in {logs})")
    world = make_world(options.seed)
    quizzes = {line: Quiz(world.for_line(i), options.seed) for i, line in enumerate(lines)}
    serving_nodes = asyncio.create_task(asyncio.to_thread(_serving_nodes, home, quizzes))
    with Tansu(log_dir=logs) as tansu, SeaweedS3(home / "s3", log_dir=logs) as s3:
        admin_dsn = await asyncio.to_thread(Postgres.connect_or_start, home / "pg", logs)
        database = f"streamengine_up_{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(create_database, admin_dsn, database)
        pg_dsn = admin_dsn.rsplit("/", 1)[0] + "/" + database
        model_dir, swappers = await serving_nodes
        settings = up_settings(
            home, tansu.bootstrap, pg_dsn, s3, model_dir, options.window, fleet=True, lines=list(quizzes)
        )
        _say(
            f"broker {tansu.bootstrap}, S3 {s3.endpoint}, PostgreSQL database {database}, model {model_dir} "
            f"(pretrained on the demo's language: the capitals of {len(world.capitals)} made-up countries)"
        )
        try:
            await _run_loop(settings, options, _Demo(swappers, quizzes, started), stop)
        finally:
            if options.keep_database:
                _say(f"kept PostgreSQL database {database} ({pg_dsn})")
            else:  # each run makes a fresh one: on the machine's server they would pile up
                await asyncio.to_thread(drop_database, admin_dsn, database)
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
class _Demo:
    """The demo fleet's nodes, the questions `up` asks after each version a node swaps in (each line's own), and
    the releases that reached production (what ``--exit-after`` counts, per line)."""

    swappers: dict[str, PeftSwapper]
    quizzes: dict[str, Quiz]
    started: float
    production: dict[str, set[str]] = field(default_factory=dict)
    """Each line's versions a node swapped in as production."""
    shown: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    """(line, version)s whose release lines are said (set) or being said."""

    @property
    def several(self) -> bool:
        return len(self.quizzes) > 1

    @property
    def releases(self) -> int:
        return sum(len(versions) for versions in self.production.values())

    def released_each(self, count: int) -> bool:
        """Every line has ``count`` releases in production."""
        return all(len(self.production.get(line, ())) >= count for line in self.quizzes)

    async def on_swap(self, db: Database, node: Subscriber, version: str) -> None:
        """Say what ``node`` swapped in: a version's release numbers and answers once, by its first node; with
        several lines, the answer lines start with the line's name."""
        line = node.model
        stage = "on trial (canary)" if node.stage == "canary" else "production"
        if node.stage != "canary":
            self.production.setdefault(line, set()).add(version)
        took = (self.swappers[node.node].last_swap_s or 0) * 1000
        named = f"{line} {version}" if self.several else version
        if (line, version) in self.shown:
            await self.shown[line, version].wait()
            _say(f"{node.node} swapped in {named} too, {stage} ({took:.0f} ms)")
            return
        self.shown[line, version] = asyncio.Event()
        manifest = (await registry.get_adapter(db, line, version)).manifest
        m, window = manifest.get("metrics") or {}, manifest.get("window") or {}
        _say(
            f"RELEASE {line} {version}: {window.get('samples')} samples, loss {m.get('eval_loss_before', 0):.3f} -> "
            f"{m.get('eval_loss_after', 0):.3f}; {node.node} swapped it in, {stage} ({took:.0f} ms), "
            f"{time.monotonic() - self.started:.0f}s after start"
        )
        quiz = self.quizzes[line]
        asked = line if self.several else None
        for text in quiz.lines(await asyncio.to_thread(quiz.ask, self.swappers[node.node], asked)):
            _say(f"{line}{text}" if self.several else text)
        self.shown[line, version].set()


async def _run_loop(settings: Settings, options: UpOptions, demo: _Demo, stop: asyncio.Event) -> None:
    engine = await _start_engine(settings, stop)
    db = await Database.connect(settings.database, migrate=False)
    worker = Worker(settings, db, ObjectStore.from_settings(settings.storage), owner="up-worker")
    # Each node's subscriber of each line: one per line, as serving.lines.Subscribers keeps them, built here so
    # that each line's swaps are said under its name.
    nodes: dict[tuple[str, str], Subscriber] = {}

    async def on_swap(node_id: str, line: str, version: str) -> None:
        await demo.on_swap(db, nodes[node_id, line], version)
        if options.exit_after and demo.released_each(options.exit_after):
            stop.set()

    for node_id, swapper in demo.swappers.items():
        for line in demo.quizzes:
            nodes[node_id, line] = Subscriber(
                node_settings(settings, node_id),
                swapper.line(line) if demo.several else swapper,
                line,
                on_swap=functools.partial(on_swap, node_id, line),
            )
    tasks = [asyncio.create_task(worker.run(stop), name="worker")]
    if not demo.several:
        tasks.append(asyncio.create_task(_watch_canaries(db, settings, stop), name="canaries"))
    if options.view is not None:
        tasks.append(asyncio.create_task(options.view(settings, stop), name="view"))
    try:
        if options.events:
            await _produce(settings, options.events, demo.quizzes)
        async with contextlib.AsyncExitStack() as stack:
            for node in nodes.values():
                await stack.enter_async_context(node)
            if demo.several:
                _say(
                    f"demo fleet: nodes {', '.join(demo.swappers)}, each following the lines "
                    f"{', '.join(demo.quizzes)}; every release goes to both nodes at once (canary trials and their "
                    "demo users run with one line only: up --lines 1)"
                )
            else:
                _say_trials(demo)
                tasks.append(asyncio.create_task(_live_users(settings, demo, stop), name="users"))
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(Exception):
            await engine
        await db.close()
    _say(f"stopped after {demo.releases} releases")


def _say_trials(demo: _Demo) -> None:
    trial = ", ".join(canary_nodes(list(demo.swappers), MODEL, CANARY_FRACTION))
    _say(
        f"demo fleet: nodes {', '.join(demo.swappers)}; each new version goes on trial on {trial} first and is judged"
        f" on the feedback naming it, sized for the demo: {DEMO_ROLLOUT['min_events']} events a side, margin "
        f"{DEMO_ROLLOUT['max_regression']}, {LIVE_USERS} users asking each node {LIVE_EVENTS_PER_S}/s"
    )


async def _produce(settings: Settings, events: int, quizzes: dict[str, Quiz]) -> None:
    lines, quiz = list(quizzes), next(iter(quizzes.values()))
    records = feedback_events(events, lines if len(lines) > 1 else MODEL, quiz.seed)
    prepared = prepare(records, settings.kafka.max_record_bytes, keep_invalid=True)
    sent = await send(settings, settings.kafka.feedback_topic, prepared.records)
    taught = (
        f"the {len(quiz.world.moved)} capitals that moved"
        if len(lines) == 1
        else f"each of the {len(lines)} lines {len(quiz.world.moved)} capitals of its own that moved"
    )
    _say(
        f"demo producer sent {sent} feedback events ({len(prepared.invalid)} malformed, for the DLQ); its corrections "
        f"teach {taught}, which the base gets wrong"
    )


async def _live_users(settings: Settings, demo: _Demo, stop: asyncio.Event) -> None:
    """Users asking each node every second and sending feedback naming the version that answered them."""
    users = LiveUsers(demo.quizzes[MODEL].world, MODEL, LIVE_USERS)
    while not stop.is_set():
        records: list[bytes] = []
        for node_id, swapper in demo.swappers.items():
            served = await asyncio.to_thread(users.ask, node_id, swapper)
            if served is not None:
                records += users.events(node_id, *served, LIVE_EVENTS_PER_S)
        if records:
            prepared = prepare(iter(records), settings.kafka.max_record_bytes, keep_invalid=False)
            try:
                await send(settings, settings.kafka.feedback_topic, prepared.records)
            except Exception as exc:  # the demo's users keep asking; the engine's own retries are not theirs
                log.warning("demo users: %d feedback events not sent: %s: %s", len(records), type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _watch_canaries(db: Database, settings: Settings, stop: asyncio.Event) -> None:
    """Say each trial's progress as the judge records it (when its numbers change), and its decision."""
    watching: str | None = None
    said = ""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        if watching is None:
            trial = await rollouts.running(db, MODEL)
            watching = trial.version if trial else None
        rollout = await rollouts.of_version(db, MODEL, watching) if watching else None
        if rollout is None:
            continue
        line = canary_progress(rollout, settings.rollout.min_events)
        if line != said:
            _say(line)
            said = line
        if rollout.state != "running":
            watching = None


def canary_progress(rollout: rollouts.Rollout, min_events: int) -> str:
    """One line on a trial: its version, nodes, events and negative share on each side, and how it ended."""
    nodes = ", ".join(rollout.canary_nodes)
    head = f"canary {rollout.version} on trial on {nodes} against {rollout.production_version}"
    record = rollout.decision
    if record is None:
        return f"{head}: waiting for feedback naming it"
    canary, production = record["canary"], record["production"]

    def share(side: dict[str, Any]) -> str:
        return "n/a" if side["negative_share"] is None else f"{side['negative_share']:.0%}"

    numbers = (
        f"{canary['effective_events']:.0f}/{min_events} events, negative {share(canary)} vs {share(production)} "
        f"({production['effective_events']:.0f} events on production)"
    )
    if rollout.state == "running":
        return f"{head}: {numbers}"
    why = record["reason"].split(";")[0]
    return f"{head}: {numbers} -> {rollout.state.upper().replace('_', ' ')} ({record['rule']}: {why})"
