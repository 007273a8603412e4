"""Summaries over runs (mean, spread) and the tables printed for docs/learning.md."""

from __future__ import annotations

from typing import Any

MEASURES = ("em", "acc", "loss")


def summarise(final: dict[str, dict[str, float]], windows: int) -> dict[str, float]:
    """One run: the earlier windows' mean, the newest window and the base skill, in every measure."""
    earlier = [final[f"w{i}"] for i in range(1, windows)]
    out: dict[str, float] = {}
    for m in MEASURES:
        out[f"earlier_{m}"] = sum(s[m] for s in earlier) / len(earlier)
        out[f"newest_{m}"] = final[f"w{windows}"][m]
        out[f"base_{m}"] = final["base"][m]
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sd(values: list[float]) -> float:
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and min over runs of every summary number (and the final scores' means)."""
    keys = runs[0]["summary"].keys()
    sets = runs[0]["final"].keys()
    return {
        "summary": {k: mean([r["summary"][k] for r in runs]) for k in keys},
        "spread": {k: sd([r["summary"][k] for r in runs]) for k in keys},
        "min": {k: min(r["summary"][k] for r in runs) for k in keys},
        "final": {s: {m: mean([r["final"][s][m] for r in runs]) for m in MEASURES} for s in sets},
        "runs": runs,
    }


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row['summary'][key]:.2f} ({row['spread'][key]:.2f})"


def case_table(case: str, rows: dict[str, dict[str, Any]]) -> str:
    """Mean (sd) over every base and data seed: exact match and token accuracy."""
    head = (
        "| row | earlier EM | earlier acc | newest EM | newest acc | base EM | base acc | s/job |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    n = max(len(row["runs"]) for row in rows.values())
    lines = [f"Case `{case}` (mean (sd) over {n} runs):", "", head]
    for name, row in rows.items():
        cells = [_cell(row, f"{part}_{m}") for part in ("earlier", "newest", "base") for m in ("em", "acc")]
        label = name if len(row["runs"]) == n else f"{name} ({len(row['runs'])} runs)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['summary']['seconds_per_job']:.1f} |")
    return "\n".join(lines)


def ratio(rows: dict[str, dict[str, Any]], top: str, key: str, bottom: str, bottom_key: str | None = None) -> str:
    if top not in rows or bottom not in rows:
        return "-"
    below = rows[bottom]["summary"][bottom_key or key]
    return f"{rows[top]['summary'][key] / below:.2f}" if below else "-"


def targets_table(cases: dict[str, dict[str, dict[str, Any]]], row: str = "default") -> str:
    """The issue's targets for ``row``: earlier / joint, newest / naive, base after / before, time / ewc+replay."""
    lines = [
        f"| case | earlier EM: {row} / joint | {row} / joint-slow | newest EM: {row} / naive | base EM: after / before "
        f"| seconds per job: {row} / ewc+replay |",
        "|---|---|---|---|---|---|",
    ]
    for case, rows in cases.items():
        cells = [
            ratio(rows, row, "earlier_em", "joint"),
            ratio(rows, row, "earlier_em", "joint-slow"),
            ratio(rows, row, "newest_em", "naive"),
            ratio(rows, row, "base_em", row, "base_em_before"),
            ratio(rows, row, "seconds_per_job", "ewc+replay"),
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_table(cases: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Step 0's checks: naive learns the newest window on every run; does longer or slower training raise joint
    (earlier and newest EM, mean (sd), runs)?"""
    joints = ("joint", "joint-long", "joint-slow")
    lines = [
        "| case | naive newest EM: mean, lowest run | " + " | ".join(joints) + " | base EM before |",
        "|---|---|---|---|---|---|",
    ]
    for case, rows in cases.items():
        naive = rows.get("naive")
        cells = [f"{naive['summary']['newest_em']:.2f}, {naive['min']['newest_em']:.2f}" if naive else "-"]
        for name in joints:
            j = rows.get(name)
            cells.append(f"{_cell(j, 'earlier_em')} / {_cell(j, 'newest_em')}, {len(j['runs'])}" if j else "-")
        cells.append(f"{next(iter(rows.values()))['summary']['base_em_before']:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
