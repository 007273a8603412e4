"""End-to-end latency: from the last event of a window to its adapter answering on a serving node, by stage.

``python -m bench.e2e`` runs the whole loop as ``streamengine up`` does (streamengine.local.up: a tansu
broker, a SeaweedFS S3 server, PostgreSQL (the machine's at 127.0.0.1:5432, else an embedded one), the
tiny Llama, the engine, a trainer worker and a serving-node Subscriber with an in-process PeftSwapper,
all with up's settings) and feeds it ``--windows`` windows of ``--window`` trainable demo events, one
window at a time: all events of a window but the last, wait until they are stored, then the last one
(its ``timestamp`` is the time it is sent), then wait until the new version answers a ``generate``
call on the serving node. Stages, from the records the system keeps:

==============  =======================================================================================
window close    the last event's ``timestamp`` (``samples.event_time``) -> ``windows.closed_at``
job claim       ``windows.closed_at`` -> ``jobs.started_at`` (a worker claimed the job)
prepare         the rest of the job outside the training process and the upload: the window's samples
                out of PostgreSQL, the parent adapter and Fisher from S3, the gate, the version, the
                registry transaction (``jobs.started_at`` -> ``adapters.created_at``, less the two below)
train           the trainer (the worker's ``streamengine_training_seconds``) less the Fisher, in the phases the
                worker records (``streamengine_trainer_phase_seconds``): waiting for a trainer (a fresh
                process starting and importing torch; the warm trainer: nothing), loading the base or
                setting up (the warm trainer holds the base), evaluating (before and after), the training
                steps, and the rest (handing the job over, saving the adapter)
Fisher          ``fisher_seconds`` of the job's result (in the manifest's metrics)
upload          upload and verify of the adapter folder (``streamengine_upload_seconds``)
relay           ``adapters.created_at`` (registry row and outbox row, one transaction) -> the Kafka
                timestamp of the ``adapter.released`` record the outbox relay produced
swap            that timestamp -> the new version answered ``generate`` on the serving node: consume,
                verify, download, swap (the Subscriber's stage times) and the answer
==============  =======================================================================================

The stages add up to the total. Reported per window, with p50 and max over the windows, and against
two baselines from the same run: the work of training itself (steps, evaluation and Fisher inside the
trainer), as ``total / (steps + evaluation + Fisher)``, and the trainer's whole time, as
``total / (train + Fisher)``. The worker runs its warm trainer (``worker.warm``, started and holding the
base before the first window, as in a worker that has been up) unless ``--cold`` (a process per job).
``--torch-threads N`` sets ``OMP_NUM_THREADS`` for the run (the trainer processes and the serving node): on a
loaded CPU, torch's default (one thread a core) spends most of its time waiting for a core.
The processes share the machine's CPUs (training runs in a child process, as the worker runs it).
Prints a table; writes JSON (``--json``, default bench/results/e2e.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Histogram

from streamengine import metrics
from streamengine.config.settings import Settings
from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.local.demo import feedback_events
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, drop_database
from streamengine.local.tinymodel import build_tiny_model
from streamengine.local.up import MODEL, up_settings
from streamengine.serving import follow
from streamengine.serving.subscriber import Outcome, Subscriber
from streamengine.serving.swappers import PeftSwapper
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.produce import prepare
from streamengine.stream.producer import start_producer

T = TypeVar("T")
PROMPT = "Capital of France?"
STAGES = ("window_close", "job_claim", "prepare", "train", "fisher", "upload", "relay", "swap")
TRAINER_PHASES = {  # parts of the train stage: the worker's phase names
    "waiting_for_trainer": ("waiting_for_trainer",),
    "set_up": ("loading_base", "setting_up"),
    "evaluating": ("evaluating",),
    "training_steps": ("training",),
}
DETAILS = {  # parts of a stage, shown indented under it
    "train": (*TRAINER_PHASES, "train_rest"),
    "swap": ("consume", "verify", "download", "hot_swap", "answer"),
}
LABELS = {
    "window_close": "window close", "job_claim": "job claim", "prepare": "prepare + registry",
    "train": "train", "waiting_for_trainer": "waiting for a trainer", "set_up": "loading the base / set up",
    "evaluating": "evaluating", "training_steps": "training steps", "train_rest": "handover",
    "fisher": "Fisher", "upload": "upload",
    "relay": "relay (outbox -> Kafka)", "swap": "swap (record -> answer)", "consume": "consume", "verify": "verify",
    "download": "download", "hot_swap": "hot-swap", "answer": "answer (generate)", "total": "total",
}  # fmt: skip


def histogram_sum(histogram: Histogram) -> float:
    """The ``_sum`` of an unlabelled histogram (seconds observed so far in this process)."""
    return sum(histogram_sums(histogram).values())


def histogram_sums(histogram: Histogram) -> dict[str, float]:
    """The ``_sum`` of each series of a histogram, by its labels' values joined (one label here: the phase)."""
    return {
        ",".join(sample.labels.values()): float(sample.value)
        for metric in histogram.collect()
        for sample in metric.samples
        if sample.name.endswith("_sum")
    }


async def poll(fn: Callable[[], Awaitable[T | None]], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """``fn()``'s first truthy value; the interval does not touch the timings, which come from records."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)


def window_events(index: int, size: int) -> list[dict[str, Any]]:
    """``size`` trainable demo events (thumbs up, corrections, good ratings) with ids unique to the window."""
    out = []
    for raw in feedback_events(size * 3, MODEL, seed=1000 + index, malformed_share=0.0):
        event = json.loads(raw)
        if event["kind"] != "thumbs_down":
            out.append(event)
        if len(out) == size:
            return out
    raise RuntimeError(f"the demo generator gave fewer than {size} trainable events")


class Loop:
    """The running system (engine, worker, serving node) and what the benchmark reads from it."""

    def __init__(self, settings: Settings, db: Database, subscriber: Subscriber, swapper: PeftSwapper) -> None:
        self.settings, self.db, self.subscriber, self.swapper = settings, db, subscriber, swapper
        self.answered: dict[str, tuple[float, float, str | None]] = {}  # version -> (at, answer_s, method)
        self.sent = 0

    async def on_swap(self, version: str) -> None:
        """The serving node's first request on the new version."""
        began = time.perf_counter()
        await asyncio.to_thread(self.swapper.generate, PROMPT, 8)
        self.answered[version] = (time.time(), time.perf_counter() - began, self.swapper.last_method)

    async def send(self, producer: Any, events: list[dict[str, Any]]) -> None:
        for event in events:
            event["timestamp"] = datetime.now(UTC).isoformat()
            (record,) = prepare([json.dumps(event).encode()], self.settings.kafka.max_record_bytes, False).records
            await producer.send_and_wait(
                self.settings.kafka.feedback_topic, value=record.value, key=record.key, headers=record.headers
            )
        self.sent += len(events)

    async def stored(self) -> bool:
        return bool(await self.db.fetchval("SELECT count(*) FROM samples WHERE model = $1", MODEL) >= self.sent)

    async def one_window(self, producer: Any, index: int, size: int, timeout_s: float) -> dict[str, Any]:
        events = window_events(index, size)
        await self.send(producer, events[:-1])
        await poll(self.stored, timeout_s, f"window {index + 1}: storing {size - 1} samples")
        window_id = await self.db.fetchval("SELECT id FROM windows WHERE model = $1 AND state = 'open'", MODEL)
        if window_id is None:
            raise RuntimeError(f"window {index + 1}: no open window after {size - 1} samples (window.max_samples?)")
        sums = (histogram_sum(metrics.TRAINING_SECONDS), histogram_sum(metrics.UPLOAD_SECONDS))
        phases = histogram_sums(metrics.TRAINER_PHASE_SECONDS)
        await self.send(producer, events[-1:])

        async def released() -> str | None:
            job = await self.db.fetchrow(
                "SELECT state, version, error FROM jobs WHERE window_id = $1 AND kind = 'train'", window_id
            )
            if job is not None and job["state"] in ("rejected", "failed"):
                raise RuntimeError(f"window {index + 1}: job {job['state']}: {job['error']} (try --no-gate)")
            return str(job["version"]) if job is not None and job["state"] == "released" else None

        version = await poll(released, timeout_s, f"window {index + 1}: training and release")
        await poll(self._answered(version), timeout_s, f"window {index + 1}: {version} answering")
        row = await self.db.fetchrow(
            "SELECT (SELECT max(event_time) FROM samples s WHERE s.window_id = w.id) AS last_event, w.closed_at,"
            " j.started_at, a.created_at AS registered_at, a.manifest FROM windows w"
            " JOIN jobs j ON j.window_id = w.id AND j.kind = 'train' JOIN adapters a ON a.job_id = j.id"
            " WHERE w.id = $1",
            window_id,
        )
        assert row is not None
        outcome = next(o for o in reversed(self.subscriber.outcomes) if o.version == version and o.status == "swapped")
        return {
            "window_id": window_id,
            "version": version,
            "last_event": row["last_event"].timestamp(),
            "closed_at": row["closed_at"].timestamp(),
            "claimed_at": row["started_at"].timestamp(),
            "registered_at": row["registered_at"].timestamp(),
            "training_process_s": histogram_sum(metrics.TRAINING_SECONDS) - sums[0],
            "upload_s": histogram_sum(metrics.UPLOAD_SECONDS) - sums[1],
            "phase_s": {
                name: seconds - phases.get(name, 0.0)
                for name, seconds in histogram_sums(metrics.TRAINER_PHASE_SECONDS).items()
            },
            "fisher_s": row["manifest"]["metrics"].get("fisher_seconds") or 0.0,
            "answered_at": self.answered[version][0],
            "answer_s": self.answered[version][1],
            "swap_method": self.answered[version][2],
            "subscriber_stages": dict(outcome.stages),
        }

    def _answered(self, version: str) -> Callable[[], Awaitable[Outcome | None]]:
        async def check() -> Outcome | None:
            if version not in self.answered:
                return None
            return next((o for o in self.subscriber.outcomes if o.version == version and o.status == "swapped"), None)

        return check


async def record_times(settings: Settings) -> dict[str, float]:
    """The Kafka timestamp (seconds) of every ``adapter.released`` record of the model line, by version."""
    consumer = await follow.open_consumer(settings.kafka, "bench-e2e-reader", 100)
    try:
        records = await follow.read_to_end(
            consumer, settings.kafka.released_topic, MODEL.encode(), 30.0, asyncio.Event()
        )
    finally:
        await consumer.stop()
    return {json.loads(r.value)["version"]: r.timestamp / 1000 for r in records or []}


def stages(raw: dict[str, Any], relayed_at: float) -> dict[str, float]:
    """Contiguous stages from one window's timestamps and durations (they add up to ``total``)."""
    job_s = raw["registered_at"] - raw["claimed_at"]
    sub = raw["subscriber_stages"]
    train = raw["training_process_s"] - raw["fisher_s"]
    parts = {part: sum(raw["phase_s"].get(p, 0.0) for p in phases) for part, phases in TRAINER_PHASES.items()}
    return {
        "window_close": raw["closed_at"] - raw["last_event"],
        "job_claim": raw["claimed_at"] - raw["closed_at"],
        "prepare": job_s - raw["training_process_s"] - raw["upload_s"],
        "train": train,
        **parts,
        "train_rest": train - sum(parts.values()),  # handing the job over, the result line (saving: evaluating)
        "fisher": raw["fisher_s"],
        "upload": raw["upload_s"],
        "relay": relayed_at - raw["registered_at"],
        "swap": raw["answered_at"] - relayed_at,
        "consume": sub.get("consume", 0.0),
        "verify": sub.get("verify", 0.0),
        "download": sub.get("download", 0.0),
        "hot_swap": sub.get("swap", 0.0),
        "answer": raw["answer_s"],
        "total": raw["answered_at"] - raw["last_event"],
    }


async def run_loop(settings: Settings, model_dir: Path, windows: int, size: int, timeout_s: float) -> list[Any]:
    stop, ready = asyncio.Event(), asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop), name="engine")
    await asyncio.wait({engine, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if engine.done():
        engine.result()  # raises why the engine could not start
    db = await Database.connect(settings.database, migrate=False)
    trainer = Worker(settings, db, ObjectStore.from_settings(settings.storage))
    worker = asyncio.create_task(trainer.run(stop))
    swapper = PeftSwapper(str(model_dir))
    await asyncio.to_thread(swapper.load_base)  # a serving node has its base model loaded already
    if trainer.trainer is not None:  # a worker that has been up: its warm trainer holds the base
        await asyncio.sleep(0)
        began = time.monotonic()
        status = await trainer.trainer.ready()
        print(f"  warm trainer ready ({time.monotonic() - began:.1f}s more): {status}", flush=True)
    producer = await start_producer(settings.kafka)
    raws = []
    try:
        subscriber = Subscriber(settings, swapper, MODEL)
        loop = Loop(settings, db, subscriber, swapper)
        subscriber.on_swap = loop.on_swap
        async with subscriber:
            for index in range(windows):
                raws.append(await loop.one_window(producer, index, size, timeout_s))
                print(f"  window {index + 1}/{windows}: {raws[-1]['version']} answering", flush=True)
        relayed = await record_times(settings)
    finally:
        stop.set()
        await producer.stop()
        await asyncio.gather(worker, engine, return_exceptions=True)
        await db.close()
    return [{**raw, "stages": stages(raw, relayed[raw["version"]])} for raw in raws]


def summarise(rows: list[dict[str, Any]], settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    names = [*STAGES, *(d for parts in DETAILS.values() for d in parts), "total"]
    summary = {
        name: {
            "p50_s": statistics.median(r["stages"][name] for r in rows),
            "max_s": max(r["stages"][name] for r in rows),
        }
        for name in names
    }
    per_window = [r["stages"]["total"] / (r["stages"]["train"] + r["stages"]["fisher"]) for r in rows]
    per_window_work = [
        r["stages"]["total"] / (r["stages"]["training_steps"] + r["stages"]["evaluating"] + r["stages"]["fisher"])
        for r in rows
    ]
    return {
        "benchmark": "e2e",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "broker, S3, PostgreSQL, engine, worker (its training child) and serving node share the CPUs",
        },
        "config": {
            "windows": args.windows,
            "window.max_samples": args.window,
            "learning.gate": settings.learning.gate,
            "training": settings.training.model_dump(mode="json"),
            "lora": settings.lora.model_dump(mode="json"),
            "worker.poll_s": settings.worker.poll_s,
            "worker.warm": settings.worker.warm,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(torch's default: one a core)"),
        },
        "windows": rows,
        "summary": summary,
        "ratios": {
            "total_over_training_work": {"median": statistics.median(per_window_work), "per_window": per_window_work},
            "total_over_training_job": {"median": statistics.median(per_window), "per_window": per_window},
        },
    }


def table(result: dict[str, Any]) -> str:
    rows, summary = result["windows"], result["summary"]
    head = f"{'stage (seconds)':<28}" + "".join(f"{'w' + str(i + 1):>8}" for i in range(len(rows)))
    head += f"{'p50':>8}{'max':>8}{'p50 share':>10}"
    lines = [head, "-" * len(head)]
    total = summary["total"]["p50_s"]
    for name in (*STAGES, "total"):
        for part, indent in ((name, ""), *((d, "  ") for d in DETAILS.get(name, ()))):
            cells = "".join(f"{r['stages'][part]:8.3f}" for r in rows)
            share = f"{summary[part]['p50_s'] / total:10.1%}" if name != "total" and not indent else " " * 10
            lines.append(
                f"{indent + LABELS[part]:<28}{cells}{summary[part]['p50_s']:8.3f}{summary[part]['max_s']:8.3f}{share}"
            )
    methods = ", ".join(str(r["swap_method"]) for r in rows)
    lines.append("")
    for key, what in (
        ("total_over_training_work", "training work (steps + evaluating + Fisher)"),
        ("total_over_training_job", "training job (train + Fisher)"),
    ):
        ratio = result["ratios"][key]
        lines.append(
            f"total / {what}: {ratio['median']:.2f} (per window "
            + ", ".join(f"{v:.2f}" for v in ratio["per_window"])
            + ")"
        )
    lines += [
        f"swap methods: {methods}; versions: {', '.join(r['version'] for r in rows)}",
    ]
    return "\n".join(lines)


async def amain(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Start the services in ``home``, run the loop, stop and drop everything."""
    logs = home / "logs"
    database = f"bench_e2e_{uuid.uuid4().hex[:8]}"
    admin_dsn = None
    try:
        with Tansu(log_dir=logs) as tansu, SeaweedS3(home / "s3", log_dir=logs) as s3:
            admin_dsn = await asyncio.to_thread(Postgres.connect_or_start, home / "pg", logs)
            pg_dsn = await asyncio.to_thread(create_database, admin_dsn, database)
            model_dir = await asyncio.to_thread(build_tiny_model, home / "model")
            settings = up_settings(home, tansu.bootstrap, pg_dsn, s3, model_dir, args.window)
            if args.no_gate:
                settings = settings.model_copy(
                    update={"learning": settings.learning.model_copy(update={"gate": False})}
                )
            if args.cold:
                settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"warm": False})})
            rows = await run_loop(settings, model_dir, args.windows, args.window, args.timeout)
            return summarise(rows, settings, args)
    finally:
        if admin_dsn is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(drop_database, admin_dsn, database)
        Postgres.stop_started()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=3, help="windows trained and swapped in (default 3)")
    parser.add_argument("--window", type=int, default=64, help="trainable samples per window (default 64, as up)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each wait may take (default 600)")
    parser.add_argument("--no-gate", action="store_true", help="release every window (learning.gate false)")
    parser.add_argument("--cold", action="store_true", help="a trainer process per job (worker.warm false)")
    parser.add_argument(
        "--torch-threads", type=int, help="OMP_NUM_THREADS of the trainers and the serving node (default: one a core)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/e2e.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    if args.windows < 1 or args.window < 2:
        parser.error("--windows must be at least 1 and --window at least 2")
    logging.basicConfig(level=logging.WARNING)
    if args.torch_threads:  # read by torch when first imported (the serving node), and kept for the trainers
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    load_at_start = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    home.chmod(0o755)  # an embedded PostgreSQL runs as `nobody` when we are root
    (home / "logs").mkdir()
    try:
        result = asyncio.run(amain(args, home))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result["machine"]["load_average_at_start"] = load_at_start
    print()
    print(table(result))
    print(f"load average (1, 5, 15 min): at start {load_at_start}, at end {result['machine']['load_average_at_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
