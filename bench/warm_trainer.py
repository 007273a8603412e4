"""A training job handed to the worker's warm trainer against one in a fresh process, and the warm trainer's
memory over many jobs.

``python -m bench.warm_trainer`` trains the same window as the worker does (``--samples`` samples, up's
training settings: 2 epochs, batch 8, LoRA r16 on q/k/v/o, the Fisher), first ``--cold`` times in a process
of its own each (the argv of ``launch.training_command``, through ``trainer_process.run_training``, as
``worker.warm: false`` runs it), then ``--jobs`` times in one warm trainer
(``jobs.warm_trainer.WarmTrainer``, started and holding the base before the first job, as in a worker
that has been up). Jobs alternate between a fresh LoRA and the previous job's adapter as parent, as a
model line's windows do. Per job: the time from handing the job over to its first training step (a
fresh process: start, imports and base load come first), and to its result. The warm trainer's resident
memory is read from its ``ready`` line after job 5 and after the last. The adapter of the first warm job
is compared byte for byte with the first cold job's (the same spec and seed).

``--base`` trains on a model folder (default: the tiny Llama, built in a scratch folder); ``--device``
(default auto: the GPU when there is one). Prints a table; writes JSON (``--json``, default
bench/results/warm_trainer.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamengine.config.settings import WorkerSettings
from streamengine.jobs.trainer_process import run_training
from streamengine.jobs.warm_trainer import WarmTrainer
from streamengine.local.tinymodel import build_tiny_model
from streamengine.training.launch import training_command
from streamengine.training.spec import Progress, TrainResult, TrainSpec
from streamengine.training.warm_protocol import Preload

ADAPTER = "adapter_model.safetensors"


@dataclass
class Timing:
    """One job: seconds from handing it over to its first step and to its result, the result's own seconds."""

    first_step_s: float = 0.0
    result_s: float = 0.0
    recipe_s: float = 0.0
    phases: list[str] = field(default_factory=list)


class Clock:
    """The handlers a job reports to, timing its first step."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.timing = Timing()

    async def progress(self, record: Progress) -> None:
        if not self.timing.first_step_s:
            self.timing.first_step_s = time.monotonic() - self.began

    async def phase(self, name: str) -> None:
        self.timing.phases.append(name)

    def done(self, result: TrainResult) -> Timing:
        self.timing.result_s, self.timing.recipe_s = time.monotonic() - self.began, result.seconds
        return self.timing


def write_window(path: Path, count: int) -> Path:
    """``count`` question/answer samples (the samples file of a job)."""
    lines = [
        {"event_id": f"e{i}", "prompt": json.dumps(f"Question {i % 16}?"), "completion": f"Answer {i % 16}."}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def job_spec(base: str, samples: Path, out: Path, parent: Path | None, device: str) -> TrainSpec:
    """up's training settings (bench.e2e's loop) on ``samples``; ``parent``: the previous job's adapter."""
    training = {"epochs": 2, "batch_size": 8, "learning_rate": 2e-3, "max_length": 128, "device": device}
    return TrainSpec(
        base_model=base,
        parent_adapter=str(parent) if parent else None,
        samples_path=str(samples),
        output_dir=str(out),
        training=training,
    )


async def cold_jobs(specs: list[TrainSpec], work: Path) -> list[Timing]:
    timings = []
    for i, spec in enumerate(specs):
        spec_path = work / f"cold-{i}.json"
        spec.write(spec_path)
        clock = Clock()
        result = await run_training(
            training_command(spec_path), work / "cold.log", TrainResult, clock.progress, on_phase=clock.phase
        )
        timings.append(clock.done(result))
    return timings


async def warm_jobs(specs: list[TrainSpec], work: Path, base: Preload) -> dict[str, Any]:
    trainer = WarmTrainer(WorkerSettings(work_dir=work, max_jobs_per_process=len(specs) + 1), work / "trainer.log")
    began = time.monotonic()
    trainer.prewarm(base)
    ready = await trainer.ready()
    start_s = time.monotonic() - began
    timings, rss = [], {}
    try:
        for i, spec in enumerate(specs, start=1):
            clock = Clock()
            result, warm = await trainer.train(spec, work / "warm.log", clock.progress, clock.phase)
            assert warm, f"warm job {i} did not run warm"
            timings.append(clock.done(result))
            if i in (5, len(specs)):
                status = await trainer.ready()
                assert status is not None and status.pid == (ready.pid if ready else None)
                rss[str(i)] = status.rss_bytes
    finally:
        await trainer.close()
    return {"start_s": start_s, "timings": timings, "rss_bytes_after": rss}


def specs_for(args: argparse.Namespace, base: str, samples: Path, work: Path, count: int, name: str) -> list[TrainSpec]:
    """``count`` jobs, a fresh LoRA and a parent's adapter in turn."""
    specs, parent = [], None
    for i in range(count):
        spec = job_spec(base, samples, work / f"{name}-{i}", parent if i % 2 else None, args.device)
        specs.append(spec)
        parent = Path(spec.output_dir)
    return specs


def summary(timings: list[Timing]) -> dict[str, float]:
    return {
        f"{name}_p50": statistics.median(getattr(t, name) for t in timings)
        for name in ("first_step_s", "result_s", "recipe_s")
    }


async def amain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = args.base or str(build_tiny_model(work / "model"))
    samples = write_window(work / "samples.jsonl", args.samples)
    cold = await cold_jobs(specs_for(args, base, samples, work, args.cold, "cold"), work)
    warm = await warm_jobs(
        specs_for(args, base, samples, work, args.jobs, "warm"), work, Preload(base_model=base, device=args.device)
    )
    same = (work / "cold-0" / ADAPTER).read_bytes() == (work / "warm-0" / ADAPTER).read_bytes()
    rss = warm["rss_bytes_after"]
    return {
        "benchmark": "warm_trainer",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"base": args.base or "tiny Llama", "samples": args.samples, "jobs": args.jobs, "cold": args.cold},
        "cold": {"summary": summary(cold), "jobs": [asdict(t) for t in cold]},
        "warm": {
            "start_s": warm["start_s"],
            "summary": summary(warm["timings"]),
            "jobs": [asdict(t) for t in warm["timings"]],
            "rss_bytes_after": rss,
            "rss_growth": rss[str(args.jobs)] / rss["5"] - 1 if "5" in rss else None,
        },
        "identical_adapter": same,
    }


def table(result: dict[str, Any]) -> str:
    cold, warm = result["cold"]["summary"], result["warm"]["summary"]
    rows = [
        ("job handed over -> first training step", "first_step_s_p50"),
        ("job handed over -> result", "result_s_p50"),
        ("  of it inside the recipe (result.seconds)", "recipe_s_p50"),
    ]
    lines = [f"{'p50 (seconds)':<44}{'cold':>10}{'warm':>10}", "-" * 64]
    lines += [f"{label:<44}{cold[key]:10.3f}{warm[key]:10.3f}" for label, key in rows]
    rss = result["warm"]["rss_bytes_after"]
    lines += [
        "",
        f"warm trainer: started and base loaded in {result['warm']['start_s']:.1f}s (before the first job)",
        "resident memory after job "
        + ", ".join(f"{n}: {b / 2**20:.0f} MiB" for n, b in rss.items())
        + (f" (growth {result['warm']['rss_growth']:+.1%})" if result["warm"]["rss_growth"] is not None else ""),
        f"first warm job's adapter identical to the first cold job's: {result['identical_adapter']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs in the warm trainer (default 50)")
    parser.add_argument("--cold", type=int, default=3, help="jobs in a process of their own each (default 3)")
    parser.add_argument("--samples", type=int, default=64, help="samples per job (default 64, as up)")
    parser.add_argument("--base", help="base model folder (default: the tiny Llama)")
    parser.add_argument("--device", default="auto", help="training device (default auto)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/warm_trainer.json"), help="JSON output")
    args = parser.parse_args(argv)
    if args.jobs < 5 or args.cold < 1:
        parser.error("--jobs must be at least 5 and --cold at least 1")
    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        result = asyncio.run(amain(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average"] = {"start": load_at_start, "end": os.getloadavg()}
    print(table(result))
    print(f"load average (1, 5, 15 min): at start {load_at_start}, at end {os.getloadavg()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
