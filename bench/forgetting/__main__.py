"""Does each window improve the model without erasing what came before, or what the base knew?

``python -m bench.forgetting`` (3 bases x 3 data seeds x 3 cases; ``--quick`` for a smoke run). Deterministic
for given bases and seeds on one machine; another CPU, or another of torch's CPU kernels, rounds differently and
moves single runs, so the report names its machine (``config.machine``) and ``--join`` refuses to pool
machines. ``ATEN_CPU_CAPABILITY=avx2`` (torch's switch) runs the AVX2 kernels on an AVX-512 machine.

1. Bases: tiny chat Llamas (hidden 128, 4 layers, byte tokenizer, 0.75M parameters) pretrained in full, from
   different seeds, on whole conversations of a base skill (``copy w`` -> ``w``, ``low W`` -> ``w``): see
   :mod:`bench.forgetting.base` (cached; the key hashes everything that shapes the base).
2. Windows, four per case, each a real training job (``recipe.train``: LoRA r16 on q/k/v/o, the exact Fisher
   at the end of each job when EWC is on, replay and anchor lines mixed in as the worker does):
   - ``conflict``: a new instruction per window with its own ending (``bang w`` -> ``w!!``, ``ask w`` -> ``w??``,
     ``dots``, ``star``): the same skill with conflicting outputs;
   - ``shared``: four instructions that mean the same (``bang``, ``yell``, ``shout``, ``cheer`` -> ``w!!``);
   - ``facts``: disjoint ``fact key`` -> ``value`` pairs per window (the shape of corrections), scored on
     the facts taught.
3. Rows (``--rows``): ``naive`` sequential LoRA, ``replay``, ``ewc+replay`` (the configuration before self
   anchors), ``+magpie`` (with anchors the base writes itself: the default before the replay share grew),
   ``+scaled`` (the replay share per earlier window) and options on top of it (``balanced`` or ``loss`` replay,
   more anchors, distillation, averaging with the parent, orthogonality; the anchor sources ``+scaled+true``: a
   curated set, ``+scaled+prompts``: a prompt-only file answered by the base, ``+scaled+stream``: the stream's
   prompts answered by the base), ``+scaled a0.2 clip`` (the second default) and ``+fisher ...`` on top of it
   (the Fisher also of the anchor lines: the third default; with other strengths, shares, set sizes and the
   Fisher's balance, and the LoRA on the MLP: ``+fisher anchor qv updown r0.45``, the fourth default), ``+qv
   updown ...`` on top of that (the anchors' weight, share, penalty, distillation: ``+qv updown aw2``, the
   fifth default), ``+aw2 rotation`` (each epoch a fresh draw from the whole anchor pool: the sixth default) and
   variants of it (``+rotation aw1`` / ``aw1.5`` / ``aw1.75``: rotated anchors weighing less; ``+aw2 rotation
   pool2``: a pool of twice the pick; ``+aw2 rotation lambda 250`` / ``1000``: a weaker or stronger penalty;
   ``+rotation aw1.75 lambda 1000``; ``+aw2 rotation gamma 0.5`` / ``0.8``: the parent's Fisher decayed,
   ``ewc.gamma``),
   ``default`` (the shipped settings, no user anchor set or prompt file) and
   ``joint`` (one job on all windows, the upper bound for the windows); ``joint-long`` (twice the epochs) and
   ``joint-slow`` (twice the epochs at a third of the learning rate) check that joint is converged and stable.
4. After the last window: exact match (every completion token the argmax, teacher-forced: the same as
   greedy decoding), token accuracy and NLL on each window's holdout and on the base skill.

Writes bench/results/forgetting.json (``cases.<case>.<row>.summary``, ``spread``, ``min``, ``runs``; each run's
``jobs`` with every window's and the base's scores after that job, its last epoch's loss and last step's penalty)
and prints the tables pasted into docs/learning.md. A long grid can run as one command per base and data seed
(``--bases B --seeds 1 --first-seed S``), pooled afterwards with ``--join``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.forgetting import report
from bench.forgetting.base import RESULTS, machine, pretrain
from bench.forgetting.experiment import JOINT, MAIN_ROWS, QUICK_SIZES, ROWS, SIZES, TRAINING, unit
from bench.forgetting.tasks import CASES


def run(bases: list[int], seeds: range, cases: list[str], rows: list[str], sizes: dict[str, int],
        jobs: int) -> dict[str, Any]:  # fmt: skip
    """Every row on every base, data seed and case; the report (JSON layout of bench/results/forgetting.json)."""
    built: dict[str, float] = {}
    folders: dict[int, Path] = {}
    for b in bases:  # pretrained first, one at a time (cached)
        t = time.monotonic()
        folders[b] = pretrain(b)
        built[folders[b].name] = time.monotonic() - t
    units = [(b, 10 * b + seed, case) for b in bases for seed in seeds for case in cases]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        done = pool.starmap(unit, [(folders[b], seed, case, rows, sizes) for b, seed, case in units])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {r: [] for r in rows} for c in cases}
    for (b, seed, case), results in zip(units, done, strict=True):
        for name, result in results.items():
            runs[case][name].append({"base": b, "seed": seed, **result})
    return {
        "config": {"sizes": sizes, "training": TRAINING, "bases": bases, "seeds": [seeds.start, seeds.stop], "rows": rows,
                   "methods": {n: vars(ROWS[n]) for n in rows if n in ROWS}, "machine": machine()},
        "pretrain_seconds": built,
        "cases": {case: {name: report.aggregate(r) for name, r in by_row.items()} for case, by_row in runs.items()},
    }  # fmt: skip


def merge(into: dict[str, Any], earlier: dict[str, Any]) -> None:
    """Add the rows of an earlier report (same bases, seeds and sizes) that this one did not run."""
    _refuse_other_runs("--merge", into["config"], earlier["config"], ("sizes", "bases", "seeds"))
    for case, rows in earlier["cases"].items():
        for name, row in rows.items():
            into["cases"].setdefault(case, {}).setdefault(name, row)
    into["config"]["merged_rows"] = sorted({n for rows in earlier["cases"].values() for n in rows})


def join(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report over the runs of several (other bases or data seeds, run separately with the same sizes and
    rows): every row's runs pooled and summarised again."""
    first = reports[0]["config"]
    for other in reports[1:]:
        _refuse_other_runs("--join", first, other["config"], ("sizes", "training"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in reports:
        for case, rows in r["cases"].items():
            for name, row in rows.items():
                runs.setdefault(case, {}).setdefault(name, []).extend(row["runs"])
    return {
        "config": {
            **first,
            "bases": sorted({b for r in reports for b in r["config"]["bases"]}),
            "seeds": [r["config"]["seeds"] for r in reports],
            "rows": list(dict.fromkeys(n for r in reports for n in r["config"]["rows"])),
        },
        "pretrain_seconds": {k: v for r in reports for k, v in r["pretrain_seconds"].items()},
        "seconds": sum(r["seconds"] for r in reports),
        "cases": {
            case: {name: report.aggregate(by_row[name]) for name in _ordered(by_row)} for case, by_row in runs.items()
        },
    }


def _refuse_other_runs(flag: str, ours: dict[str, Any], theirs: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Exit if two reports' configs differ in ``keys`` or their machine (reports from before ``config.machine``
    name none and pool as they did)."""
    for key in (*keys, "machine"):
        mine, other = ours.get(key), theirs.get(key)
        if mine != other and None not in (mine, other):
            raise SystemExit(f"{flag}: the reports' {key} differ: {mine} and {other}")


def _ordered(rows: Iterable[str]) -> list[str]:
    """Row names in the tables' order (the order of ``ROWS``, then joint)."""
    order = [*ROWS, *JOINT]
    return sorted(rows, key=lambda name: order.index(name) if name in order else len(order))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "forgetting.json")
    parser.add_argument("--bases", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    parser.add_argument("--seeds", type=int, default=3, help="data seeds per base (base b: 10b, 10b+1, ...)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at data seed 10b + this")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", default=MAIN_ROWS, help=f"of {', '.join([*ROWS, *JOINT])}")
    parser.add_argument("--quick", action="store_true", help="smoke run: one base, one seed, tiny windows")
    parser.add_argument("--jobs", type=int, default=1, help="processes (each one thread; same results)")
    parser.add_argument("--merge", type=Path, help="add the other rows of an earlier report (same runs)")
    parser.add_argument("--tables", type=Path, help="only print the tables of a report")
    parser.add_argument("--join", type=Path, nargs="+", help="pool the runs of reports on other bases into --out")
    args = parser.parse_args(argv)
    if args.tables:
        print_tables(json.loads(args.tables.read_text()))
        return 0
    if args.join:
        joined = join([json.loads(path.read_text()) for path in args.join])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(joined, indent=2))
        print_tables(joined)
        return 0
    unknown = [name for name in args.rows.split(",") if name not in ROWS and name not in JOINT]
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)} (of {', '.join([*ROWS, *JOINT])})")
    sizes, bases, seeds = (QUICK_SIZES, args.bases[:1], 1) if args.quick else (SIZES, args.bases, args.seeds)
    seeds_ = range(args.first_seed, args.first_seed + seeds)
    started = time.monotonic()
    report_ = run(bases, seeds_, args.cases.split(","), args.rows.split(","), sizes, args.jobs)
    report_["seconds"] = time.monotonic() - started
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        merge(report_, earlier)
        report_["seconds"] += earlier["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report_, indent=2))
    print_tables(report_)
    print(f"\n{report_['seconds']:.0f} s; JSON in {args.out}")
    return 0


def print_tables(report_: dict[str, Any]) -> None:
    cases = {case: {name: rows[name] for name in _ordered(rows)} for case, rows in report_["cases"].items()}
    print("\n\n".join(report.case_table(case, rows) for case, rows in cases.items()))
    print("\n" + report.targets_table(report_["cases"]))
    print("\n" + report.checks_table(report_["cases"]))
    if "machine" in report_["config"]:
        print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in report_["config"]["machine"].items()))


if __name__ == "__main__":
    raise SystemExit(main())
