"""Metric series a number of model lines cost: every metric labelled by line set once per line, as `run` (ingest
and the scheduler) and a worker (training and release) would set them, counted in prometheus_client's exposition
(counters also export their ``_created`` series).

Run: ``python -m bench.line_series --lines 1000``
"""

from __future__ import annotations

import argparse

from prometheus_client import REGISTRY, generate_latest

from streamengine import metrics as m


def exported() -> int:
    return sum(1 for line in generate_latest(REGISTRY).decode().splitlines() if line and not line.startswith("#"))


def run_series(line: str) -> None:
    m.SAMPLES_STORED.labels(line).inc()
    m.WINDOW_SAMPLES.labels(line).set(1)
    m.WINDOW_WEIGHT.labels(line).set(1)
    for reason in ("threshold", "schedule", "manual"):
        m.WINDOWS_CLOSED.labels(line, reason).inc()
    for outcome in ("closed", "skipped"):
        m.TICKS.labels(line, outcome).inc()
    m.LAST_RELEASE.labels(line).set(1)
    m.LAST_TICK.labels(line).set(1)
    m.NEXT_TICK.labels(line).set(1)


def worker_series(line: str) -> None:
    m.TRAINING_LOSS.labels(line).set(1)
    m.EWC_PENALTY.labels(line).set(1)
    for phase in ("before", "after"):
        m.EVAL_LOSS.labels(line, phase).set(1)
    m.FORGETTING.labels(line).set(1)
    for reason in ("threshold", "schedule", "manual"):
        m.RELEASES.labels(line, reason).inc()
    m.REJECTIONS.labels(line).inc()
    m.JOB_FAILURES.labels(line).inc()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.line_series", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    lines = [f"line-{i}" for i in range(parser.parse_args().lines)]
    before = exported()
    for line in lines:
        run_series(line)
    run = exported() - before
    for line in lines:
        worker_series(line)
    worker = exported() - before - run
    print(
        f"{len(lines)} lines: run {run} series ({run / len(lines):g} a line), worker {worker} ({worker / len(lines):g})"
    )


if __name__ == "__main__":
    main()
