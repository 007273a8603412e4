"""Feedback producer benchmark: the serving nodes' SDK against a raw aiokafka producer, in one run.

The same 1 KB feedback events (``bench.ingest.make_event``: realistic prompts, chat transcripts, ratings,
corrections) sent to a tansu broker three ways, each waiting for every acknowledgement:

``raw``   an aiokafka producer (the options the SDK gives its own: ``acks=all``, ``linger_ms=5``) sending
          records already made: key, value and headers exactly as the SDK made them for the same events;
``sdk``   :class:`streamengine.serving.FeedbackProducer`: ``await send(**fields)`` per event, with what a
          serving node gets for it: validation, a fresh ``event_id`` (UUIDv7) and ``timestamp``,
          ``adapter_version`` from a version source, JSON encoding checked by ingest's decoder, key and
          CloudEvents headers, the bounded buffer (10 000 events, so it waits on it) and the metrics;
``sync``  :class:`streamengine.serving.SyncFeedbackProducer` called from one thread of a threaded server.

Rate: events over the wall time from the first send to the last acknowledgement. CPU: this process
(``time.process_time``, every thread) and the broker (``psutil``), per event, over the same interval.
Repeats alternate the order of the phases; each phase sends to a topic of its own. Target: sdk >= 0.5x raw.

Run: ``python -m bench.produce --events 30000 --repeat 3`` (starts its own tansu broker, stops it after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import RECORD_BYTES, make_event
from streamengine.config.settings import Settings, load_settings
from streamengine.local.embedded import Tansu
from streamengine.serving import FeedbackProducer, SyncFeedbackProducer
from streamengine.stream.producer import start_producer
from streamengine.stream.sender import Record
from streamengine.stream.topics import ensure_topics

try:
    import psutil
except ImportError:  # pragma: no cover - psutil ships with the dev environment
    psutil = None

PHASES = ("raw", "sdk", "sync")
LABELS = {
    "raw": "raw aiokafka producer",
    "sdk": "FeedbackProducer (async)",
    "sync": "SyncFeedbackProducer (thread)",
}
VERSION = "v1.3"


def make_fields(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """What a serving node passes per event: the fields of ``make_event`` without the ones the SDK fills."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fields = json.loads(make_event(i, rng))
        for stamped in ("event_id", "timestamp", "adapter_version"):
            del fields[stamped]
        out.append(fields)
    return out


def _broker_cpu(pid: int | None) -> float | None:
    if psutil is None or pid is None:
        return None
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass
class Result:
    phase: str
    events: int
    seconds: float
    events_per_s: float
    cpu_us_per_event: float
    broker_cpu_us_per_event: float | None


class Clock:
    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid

    def __enter__(self) -> Clock:
        self.broker0 = _broker_cpu(self.broker_pid)
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1, self.cpu1 = time.perf_counter(), time.process_time()
        self.broker1 = _broker_cpu(self.broker_pid)

    def result(self, phase: str, events: int) -> Result:
        wall = self.t1 - self.t0
        broker = None if self.broker0 is None or self.broker1 is None else self.broker1 - self.broker0
        return Result(
            phase, events, wall, events / wall, (self.cpu1 - self.cpu0) / events * 1e6,
            None if broker is None else broker / events * 1e6,
        )  # fmt: skip


async def run_raw(settings: Settings, records: list[Record], broker_pid: int | None) -> Result:
    producer = await start_producer(settings.kafka)
    topic = settings.kafka.feedback_topic
    try:
        with Clock(broker_pid) as clock:
            futures = [await producer.send(topic, r.value, key=r.key, headers=r.headers) for r in records]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return clock.result("raw", len(records))


async def run_sdk(settings: Settings, events: list[dict[str, Any]], broker_pid: int | None) -> Result:
    async with FeedbackProducer(settings, versions=lambda model: VERSION) as feedback:
        with Clock(broker_pid) as clock:
            futures = [await feedback.send(**fields) for fields in events]
            await asyncio.gather(*futures)
    return clock.result("sdk", len(events))


def run_sync(settings: Settings, events: list[dict[str, Any]], broker_pid: int | None) -> Result:
    with SyncFeedbackProducer(settings, versions=lambda model: VERSION) as feedback, Clock(broker_pid) as clock:
        futures = [feedback.send(**fields) for fields in events]
        for future in futures:
            future.result()
    return clock.result("sync", len(events))


def encoded(settings: Settings, events: list[dict[str, Any]]) -> list[Record]:
    """The records the SDK makes of ``events``: what the raw producer sends."""
    feedback = FeedbackProducer(settings, versions=lambda model: VERSION)
    return [feedback.record(**fields) for fields in events]


async def one_repeat(
    number: int, bootstrap: str, phases: list[str], events: list[dict[str, Any]], records: list[Record],
    broker_pid: int | None,
) -> list[Result]:  # fmt: skip
    results = []
    order = phases if number % 2 else phases[::-1]
    for phase in order:
        settings = bench_settings(bootstrap, f"bench.produce.{number}.{phase}")
        await ensure_topics(settings.kafka)
        if phase == "raw":
            result = await run_raw(settings, records, broker_pid)
        elif phase == "sdk":
            result = await run_sdk(settings, events, broker_pid)
        else:
            result = await asyncio.to_thread(run_sync, settings, events, broker_pid)
        print(f"  repeat {number}: {LABELS[phase]:<30} {result.events_per_s:>10,.0f} events/s", flush=True)
        results.append(result)
    return results


def bench_settings(bootstrap: str, topic: str) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": bootstrap, "feedback_topic": topic, "partitions": 6},
        model={"name": "bench-llama"},
    )


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(
    args: argparse.Namespace, phases: list[str], runs: list[list[Result]], load: dict[str, str]
) -> dict[str, Any]:
    by_phase = {p: [r for run in runs for r in run if r.phase == p] for p in phases}
    rows = {
        phase: {
            "label": LABELS[phase],
            "events_per_s": _median([r.events_per_s for r in results]),
            "cpu_us_per_event": _median([r.cpu_us_per_event for r in results]),
            "broker_cpu_us_per_event": _median([r.broker_cpu_us_per_event for r in results]),
            "runs": [asdict(r) for r in results],
        }
        for phase, results in by_phase.items()
    }
    ratios: dict[str, list[float]] = {"sdk_vs_raw": [], "sync_vs_raw": []}
    for run in runs:
        rate = {r.phase: r.events_per_s for r in run}
        for name in ("sdk", "sync"):
            if name in rate and "raw" in rate:
                ratios[f"{name}_vs_raw"].append(rate[name] / rate["raw"])
    medians = {name: _median(list(values)) for name, values in ratios.items()}
    target = medians["sdk_vs_raw"]
    return {
        "benchmark": "produce",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "uptime_at_start": load["start"],
            "uptime_at_end": load["end"],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "the broker and the benchmark share the machine's CPUs with whatever else runs",
        },
        "config": {"events": args.events, "record_bytes": RECORD_BYTES, "repeat": args.repeat, "partitions": 6},
        "phases": rows,
        "ratios": {name: {"median": medians[name], "runs": values} for name, values in ratios.items()},
        "targets": {"sdk_vs_raw >= 0.5": None if target is None else target >= 0.5},
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    phases = summary["phases"]
    raw = phases.get("raw", {}).get("events_per_s")
    head = f"{'path':<30} {'events/s':>10} {'CPU us/ev':>10} {'broker us/ev':>12} {'this/raw':>9}"
    lines = [head, "-" * len(head)]
    for row in phases.values():
        ratio = row["events_per_s"] / raw if raw and row["events_per_s"] else None
        lines.append(
            f"{row['label']:<30} {_fmt(row['events_per_s'], ',.0f'):>10} {_fmt(row['cpu_us_per_event'], '.1f'):>10}"
            f" {_fmt(row['broker_cpu_us_per_event'], '.1f'):>12} {_fmt(ratio, '.2f'):>9}"
        )
    lines.append("")
    for name, values in summary["ratios"].items():
        if values["median"] is None:
            continue
        each = ", ".join(f"{r:.2f}" for r in values["runs"])
        verdict = (
            (" (target >= 0.5: " + ("met" if values["median"] >= 0.5 else "MISSED") + ")")
            if name == "sdk_vs_raw"
            else ""
        )
        lines.append(f"{name.replace('_vs_', ' / ')}: {values['median']:.2f}{verdict}; per repeat {each}")
    machine = summary["machine"]
    lines.append(f"uptime at start: {machine['uptime_at_start']}")
    lines.append(f"uptime at end:   {machine['uptime_at_end']}")
    return "\n".join(lines)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


async def amain(args: argparse.Namespace, phases: list[str], tansu: Tansu) -> list[list[Result]]:
    print(f"making {args.events:,} events of {RECORD_BYTES} bytes ...", flush=True)
    events = make_fields(args.events)
    records = encoded(bench_settings(tansu.bootstrap, "unused"), events)
    gc.collect()
    gc.freeze()  # the benchmark's own events are not the producer's memory: keep the collector off them
    runs = []
    for number in range(1, args.repeat + 1):
        runs.append(await one_repeat(number, tansu.bootstrap, phases, events, records, tansu.pid))
    return runs


def run(args: argparse.Namespace, phases: list[str], progress: Callable[[str], None] = print) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-produce-"))
    load = {"start": _uptime()}
    progress(f"uptime: {load['start']}")
    tansu = Tansu(log_dir)
    try:
        tansu.start()
        runs = asyncio.run(amain(args, phases, tansu))
    finally:
        tansu.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    load["end"] = _uptime()
    return summarise(args, phases, runs, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.produce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000, help="events per phase and repeat (default 30000)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every phase (default 3)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--json", type=Path, default=Path("bench/results/produce.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    summary = run(args, phases)
    print()
    print(table(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
