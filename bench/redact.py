"""Redaction cost on ingest's CPU step: ``IngestPipeline.classify`` (decode, validate, redact, event -> sample ->
COPY line) of the same 1 KB events with ``privacy.redact`` off and on, in one process, interleaved.

The end-to-end effect through the broker and PostgreSQL is ``python -m bench.ingest --phases ingest,plain``;
this isolates the CPU the redaction adds, which is what the ingest path spends per event besides waiting.

Run: ``python -m bench.redact`` (no services needed; ~1 min).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.ingest import MODEL, make_event
from streamengine.config.settings import load_settings
from streamengine.stream.ingest import IngestPipeline, RawRecord

_PII = [
    "Please reply to {name}.{n}@example.com.",
    "You can reach me on +44 20 7946 {n:04d} after six.",
    "My card 4111 1111 1111 1111 was charged twice.",
    "Call (555) 123-{n:04d} or write to support{n}@example.org.",
]


def records(n: int, pii_share: float, seed: int = 0) -> list[RawRecord]:
    """``n`` records of bench.ingest's 1 KB events; ``pii_share`` of them get personal data in their prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value = make_event(i, rng)
        if rng.random() < pii_share:
            event = json.loads(value)
            extra = rng.choice(_PII).format(name=rng.choice(["ann", "bob", "eve"]), n=rng.randint(0, 9999))
            if isinstance(event["prompt"], str):
                event["prompt"] = f"{extra} {event['prompt']}"
            else:
                event["prompt"][-1]["content"] = f"{extra} {event['prompt'][-1]['content']}"
            value = json.dumps(event).encode()
        out.append(RawRecord("bench", i % 6, i, b"u", value, []))
    return out


def pipeline(redact: bool) -> IngestPipeline:
    settings = load_settings(model={"name": MODEL}, privacy={"redact": ["email", "phone", "card"] if redact else []})
    return IngestPipeline(settings, db=None, sender=None)  # type: ignore[arg-type]  # classify does no I/O


def measure(batch: list[RawRecord], redact: bool, repeats: int, chunk: int = 1000) -> list[float]:
    """CPU microseconds per event of classify (this process's CPU time: other load on the machine
    disturbs it far less than wall time), one value per repeat."""
    step = pipeline(redact)
    times = []
    for _ in range(repeats):
        started = time.process_time()
        for start in range(0, len(batch), chunk):
            step.classify(batch[start : start + chunk])
        times.append((time.process_time() - started) / len(batch) * 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per measurement (default 20000)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved off/on repeats (default 7)")
    parser.add_argument("--pii", type=float, nargs="+", default=[0.0, 0.1, 1.0], help="shares of events with PII")
    parser.add_argument("--json", type=Path, default=Path("bench/results/redact.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"benchmark": "redact", "events": args.events, "repeat": args.repeat, "rows": []}
    print(f"{'PII share':>9} {'off CPU us/ev':>14} {'on CPU us/ev':>13} {'added us/ev':>11} {'on/off':>7}")
    for share in args.pii:
        batch = records(args.events, share)
        gc.collect()
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.repeat):  # interleaved, so drift in machine load hits both alike
            off += measure(batch, False, 1)
            on += measure(batch, True, 1)
        row = {"pii_share": share, "off_us": statistics.median(off), "on_us": statistics.median(on)}
        row["added_us"] = row["on_us"] - row["off_us"]
        row["ratio"] = row["on_us"] / row["off_us"]
        results["rows"].append(row)
        print(
            f"{share:>9.2f} {row['off_us']:>14.1f} {row['on_us']:>13.1f} {row['added_us']:>11.1f} {row['ratio']:>7.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
