"""Canary judgement benchmark: error rates and events to a decision of the rollout test, over simulated rollouts.

No services: the decision code alone (``streamengine.core.rollout``), at the ``rollout.*`` defaults, on
the counts it would see. Each simulated rollout draws the line's feedback in ingest batches (``--batch``
events each, the canary getting ``--canary-share`` of them on average), every event negative with the
production rate (``--base``) or the canary's (base + difference), and judges after every batch with the
clock at ``events / --rate`` hours, until a decision or the timeout (``rollout.max_duration``). Production
is counted over the canary's time only (a store that also counts its earlier feedback decides sooner).
Honest feedback comes from many users, each below the per-user cap, and is passed as the store may pass
it (one anonymous tally, see ``side_counts``); the flood cases add one user sending as many events as the
canary's honest traffic, all negative on an equal canary or all positive on a canary worse by 2x the margin.

Targets: false rollbacks (equal canary) <= 5%, false promotions (canary worse by 2x the margin) <= 5%;
the flood cases are held to the same bounds.

Run: ``python -m bench.rollout`` (2,000 rollouts per case, seeded; about 8 CPU minutes, ``--jobs N`` spreads them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streamengine.config.settings import RolloutSettings
from streamengine.core.rollout import Action, RolloutPolicy, Rule, UserTally, decide, side_counts

TARGET = 0.05
"""Most false rollbacks of an equal canary, and false promotions of one worse by 2x the margin."""
START = datetime(2025, 1, 6, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    difference: float
    """Canary's negative rate minus production's (absolute)."""
    flood: int = 0
    """+1: one user floods negatives; -1: positives; 0: none."""
    wrong: str | None = None
    """The action that is an error in this case (its rate is held to TARGET)."""


@dataclass(frozen=True, slots=True)
class Config:
    rollouts: int
    base: float
    canary_share: float
    batch: int
    rate: float
    """Feedback events of the line per hour (sets the clock, so when max_duration is reached)."""
    seed: int
    policy: RolloutPolicy


@dataclass(frozen=True, slots=True)
class Result:
    action: str
    rule: str
    canary_events: int
    events: int
    hours: float


def cases(margin: float) -> list[Case]:
    worse = [Case(f"{d} point{'s' * (d != 1)} worse", d / 100) for d in (1, 2, 5, 10)]
    return [
        Case("equal", 0.0, wrong="rollback"),
        *worse,
        Case("2x margin worse", 2 * margin, wrong="promote"),
        Case("equal, one user floods negatives", 0.0, flood=1, wrong="rollback"),
        Case("2x margin worse, one user floods praise", 2 * margin, flood=-1, wrong="promote"),
    ]


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def simulate(cfg: Config, case: Case, index: int) -> Result:
    """One rollout, judged after every batch until it is decided."""
    rng = random.Random(f"{cfg.seed}/{case.difference}/{case.flood}/{index}")
    policy, canary_rate = cfg.policy, cfg.base + case.difference
    canary = [0, 0]  # honest events, negatives
    production = [0, 0]
    flood = 0
    while True:
        in_canary = _binomial(rng, cfg.batch, cfg.canary_share)
        canary[0] += in_canary
        canary[1] += _binomial(rng, in_canary, canary_rate)
        production[0] += cfg.batch - in_canary
        production[1] += _binomial(rng, cfg.batch - in_canary, cfg.base)
        flood += in_canary if case.flood else 0
        tallies = [UserTally(None, *canary)]
        if flood:
            tallies.append(UserTally("flooder", flood, flood if case.flood > 0 else 0))
        events = canary[0] + production[0]
        hours = events / cfg.rate
        decision = decide(
            side_counts(tallies, policy.max_user_share),
            side_counts([UserTally(None, *production)], policy.max_user_share),
            failed_nodes=0,
            started_at=START,
            now=START + timedelta(hours=hours),
            policy=policy,
        )
        if decision.action is not Action.WAIT:
            return Result(decision.action, decision.rule, canary[0], events, hours)


def _one(args: tuple[Config, Case, int]) -> Result:
    return simulate(*args)


def summarise(case: Case, outcomes: list[Result]) -> dict[str, Any]:
    n = len(outcomes)

    def share(action: str) -> float:
        return sum(o.action == action for o in outcomes) / n

    row: dict[str, Any] = {
        "case": case.name,
        "difference": case.difference,
        "flood": case.flood,
        "rollouts": n,
        "promoted": share(Action.PROMOTE),
        "rolled_back": share(Action.ROLLBACK),
        "timed_out": sum(o.rule == Rule.TIMEOUT for o in outcomes) / n,
        "median_canary_events": statistics.median(o.canary_events for o in outcomes),
        "median_events": statistics.median(o.events for o in outcomes),
        "median_hours": statistics.median(o.hours for o in outcomes),
        "wrong": case.wrong,
    }
    if case.wrong is not None:
        row["error_rate"] = share(case.wrong)
        row["target_met"] = row["error_rate"] <= TARGET
    return row


def run(cfg: Config, jobs: int, only: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    with multiprocessing.Pool(jobs) as pool:
        for case in (c for c in cases(cfg.policy.max_regression) if only is None or c.name in only):
            outcomes = pool.map(_one, [(cfg, case, i) for i in range(cfg.rollouts)], chunksize=20)
            rows.append(summarise(case, outcomes))
            print(f"  {case.name}: done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"| {'case':<40} | {'promoted':>8} | {'rolled back':>11} | {'timed out':>9} | {'canary events':>13} "
        f"| {'all events':>10} | {'hours':>5} | {'error (target <= 5%)':<20} |"
    )
    lines = [head, "|" + "|".join("-" * (len(cell)) for cell in head.split("|")[1:-1]) + "|"]
    for r in rows:
        verdict = "met" if r.get("target_met") else "MISSED"
        error = "" if r["wrong"] is None else f"{r['error_rate']:.1%} {r['wrong']} {verdict}"
        lines.append(
            f"| {r['case']:<40} | {r['promoted']:>8.1%} | {r['rolled_back']:>11.1%} | {r['timed_out']:>9.1%} "
            f"| {r['median_canary_events']:>13,.0f} | {r['median_events']:>10,.0f} | {r['median_hours']:>5.1f} | {error:<20} |"
        )
    return "\n".join(lines)


def _policy(args: argparse.Namespace) -> RolloutPolicy:
    """The ``rollout.*`` defaults, with the options given."""
    settings = RolloutSettings()
    policy = RolloutPolicy(**{f.name: getattr(settings, f.name) for f in fields(RolloutPolicy)})
    overrides = {"max_regression": args.margin, "confidence": args.confidence, "min_events": args.min_events,
                 "max_user_share": args.max_user_share}  # fmt: skip
    return RolloutPolicy(**{**asdict(policy), **{k: v for k, v in overrides.items() if v is not None}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=2000, help="simulated rollouts per case (default 2000)")
    parser.add_argument("--base", type=float, default=0.10, help="production's negative rate (default 0.10)")
    parser.add_argument(
        "--canary-share", type=float, default=None, help="canary's share of feedback (default rollout.canary_fraction)"
    )
    parser.add_argument(
        "--batch", type=int, default=100, help="events of the line per ingest batch, one look each (default 100)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="events of the line per hour (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=None, help="rollout.max_regression (default: the setting's)")
    parser.add_argument("--confidence", type=float, default=None, help="rollout.confidence")
    parser.add_argument("--min-events", type=int, default=None, help="rollout.min_events")
    parser.add_argument("--max-user-share", type=float, default=None, help="rollout.max_user_share")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--only", action="append", help="run only this case (by its name; repeatable)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/rollout.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    policy = _policy(args)
    share = RolloutSettings().canary_fraction if args.canary_share is None else args.canary_share
    cfg = Config(args.rollouts, args.base, share, args.batch, args.rate, args.seed, policy)
    rows = run(cfg, args.jobs, args.only)
    print(table(rows))
    summary = {
        "benchmark": "rollout",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {**asdict(cfg), "policy": {**asdict(policy), "max_duration": policy.max_duration.total_seconds()}},
        "cases": rows,
        "targets_met": all(r["target_met"] for r in rows if r["wrong"] is not None),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.json}")
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
