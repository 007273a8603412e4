"""A training job's data: the window's samples (user-capped), replay, anchors and the eval sets.

Written as JSONL files for the training process (one object per line: event_id, prompt, completion,
weight, label, source). Everything is deterministic for a given job, so a retry sees the same data.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamengine import metrics
from streamengine.config.settings import LearningSettings, Settings
from streamengine.core.replay import CANDIDATES_PER_SAMPLE, pick_balanced, replay_share
from streamengine.core.samples import Sample, is_holdout, split_holdout, user_share_factors
from streamengine.errors import ConfigError, TrainingError
from streamengine.store import samples as sample_store
from streamengine.store.db import Database


@dataclass
class JobData:
    samples_path: Path
    eval_sets: dict[str, Path]
    counts: dict[str, int] = field(default_factory=dict)
    capped_weight: float = 0.0
    replay_keep: int | None = None  # replay_selection loss: the replay lines are candidates, this many kept
    anchor_per_epoch: int | None = None  # anchor_rotation: the anchor lines are the pool, this many per epoch


def _line(event_id: str, prompt: str, completion: str, weight: float, label: int, source: str) -> str:
    return json.dumps(
        {
            "event_id": event_id,
            "prompt": prompt,
            "completion": completion,
            "weight": weight,
            "label": label,
            "source": source,
        },
        ensure_ascii=False,
    )


def _sample_line(sample: Sample, source: str, weight: float | None = None) -> str:
    w = sample.weight if weight is None else weight
    return _line(sample.event_id, sample.prompt, sample.completion, w, sample.label, source)


def read_anchor_set(path: Path) -> list[dict[str, Any]]:
    """Anchor samples (the user's ``learning.anchor_path``, or the self-anchor set): JSONL of
    {"prompt": str or messages, "completion": str, "weight"?: float}."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"anchor set {path} (learning.anchor_path or the self-anchor set): {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, completion = item["prompt"], item["completion"]
            if not isinstance(completion, str) or not isinstance(prompt, str | list):
                raise TypeError("prompt must be a string or a messages list, completion a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"anchor set {path}:{number}: {type(exc).__name__}: {exc}") from None
        items.append(
            {
                "event_id": f"anchor-{number}",
                "prompt": json.dumps(prompt, ensure_ascii=False),
                "completion": completion,
                "weight": float(item.get("weight", 1.0)),
            }
        )
    return items


def job_mix(window: int, replay_fraction: float, anchor_fraction: float, anchor_min: int = 0) -> tuple[int, int]:
    """How many replay and anchor samples join ``window`` training samples to make up these shares of the job;
    at least ``anchor_min`` anchors when there are any (a few anchors, repeated every epoch, hold no skill)."""
    total = window / (1 - replay_fraction - anchor_fraction)
    anchors = max(round(anchor_fraction * total), anchor_min) if anchor_fraction > 0 else 0
    return round(replay_fraction * total), anchors


def _anchor_lines(items: list[dict[str, Any]], factor: float = 1.0) -> list[str]:
    return [_line(i["event_id"], i["prompt"], i["completion"], i["weight"] * factor, 1, "anchor") for i in items]


async def prepare(
    db: Database,
    settings: Settings,
    job_id: int,
    model: str,
    window_id: int,
    folder: Path,
    with_negatives: bool = False,
    anchor_path: Path | None = None,
) -> JobData:
    """The job's samples file and eval sets; ``anchor_path`` is its anchor set (:mod:`anchors`), if any."""
    learning = settings.learning
    window = await sample_store.window_samples(db, window_id, with_negatives)
    train, holdout = split_holdout(window, learning.min_holdout_samples)
    if not any(s.label > 0 for s in train):
        raise TrainingError(f"window {window_id} has no trainable samples outside its holdout")
    factors = user_share_factors([(s.user_id, s.weight) for s in train], learning.max_user_share)
    capped = sum(s.weight * (1 - factors[s.user_id]) for s in train if s.user_id in factors)
    if capped:
        metrics.WEIGHT_CAPPED.inc(capped)
        metrics.SAMPLES_DOWNWEIGHTED.inc(sum(1 for s in train if s.user_id in factors))

    anchors: list[dict[str, Any]] = []
    if anchor_path is not None:
        anchors = await asyncio.to_thread(read_anchor_set, anchor_path)
    anchor_eval = [a for a in anchors if is_holdout(a["event_id"], 0.5)]
    anchor_pool = [a for a in anchors if not is_holdout(a["event_id"], 0.5)]
    anchor_share = learning.anchor_fraction if anchor_pool else 0.0
    earlier = await sample_store.earlier_windows(db, model, window_id)
    share = replay_share(learning.replay_fraction, earlier, learning.replay_scaling, learning.max_replay_fraction)
    n_replay, n_anchor = job_mix(len(train), share, anchor_share, learning.anchor_min_samples)
    replay, replay_keep = await _replay(db, learning, model, window_id, n_replay, f"replay-{job_id}")
    n_picked = min(len(anchor_pool), n_anchor)
    # Rotation: the whole pool (in a seeded order) goes in, and the trainer draws n_picked of it each epoch.
    per_epoch = n_picked if learning.anchor_rotation and 0 < n_picked < len(anchor_pool) else None
    picked = random.Random(job_id).sample(anchor_pool, n_picked if per_epoch is None else len(anchor_pool))

    lines = [_sample_line(s, "window", s.weight * factors.get(s.user_id or "", 1.0)) for s in train]
    lines += [_sample_line(s, "replay") for s in replay] + _anchor_lines(picked, learning.anchor_weight)
    samples_path = folder / "samples.jsonl"
    eval_sets: dict[str, list[str]] = {
        "holdout": [_sample_line(s, "window") for s in holdout if s.label > 0],
        "retention": [
            _sample_line(s, "replay")
            for _, s in await sample_store.earlier_samples(
                db, model, window_id, holdout=True, limit=learning.retention_max_samples, seed="retention"
            )
        ],
        "anchor": _anchor_lines(anchor_eval),
    }
    paths = {name: folder / f"eval-{name}.jsonl" for name, rows in eval_sets.items() if rows}

    def write() -> None:
        samples_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name, path in paths.items():
            path.write_text("\n".join(eval_sets[name]) + "\n", encoding="utf-8")

    await asyncio.to_thread(write)
    counts = {"window": len(train), "replay": len(replay), "anchor": len(picked)}
    counts.update({"anchor_per_epoch": per_epoch} if per_epoch is not None else {})
    counts.update({f"eval_{name}": len(rows) for name, rows in eval_sets.items()})
    return JobData(samples_path, paths, counts, capped, replay_keep, per_epoch)


async def _replay(db: Database, learning: LearningSettings, model: str, window_id: int, n: int,
                  seed: str) -> tuple[list[Sample], int | None]:  # fmt: skip
    """The replay lines of the samples file, and how many of them the trainer keeps (``loss``: it scores
    these candidates with the parent adapter and keeps the ``n`` it gets most wrong; else all)."""
    uniform = learning.replay_selection == "uniform"
    limit = n if uniform else n * CANDIDATES_PER_SAMPLE
    pool = await sample_store.earlier_samples(db, model, window_id, holdout=False, limit=limit, seed=seed)
    if uniform:
        return [s for _, s in pool], None
    if learning.replay_selection == "balanced":
        return [s for _, s in pick_balanced(pool, n, lambda c: c[0], lambda c: c[1].prompt)], None
    return [s for _, s in pool], min(n, len(pool))
