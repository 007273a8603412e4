"""Reading samples back for training: a window's own, replay from earlier windows, retention holdouts."""

from __future__ import annotations

import json

import asyncpg

from streamengine.core.samples import Sample
from streamengine.store.db import Database


def _sample(r: asyncpg.Record) -> Sample:
    return Sample(
        event_id=r["event_id"],
        model=r["model"],
        kind=r["kind"],
        prompt=json.dumps(r["prompt"], ensure_ascii=False),
        completion=r["completion"],
        weight=r["weight"],
        label=r["label"],
        user_id=r["user_id"],
        session_id=r["session_id"],
        adapter_version=r["adapter_version"],
        event_time=r["event_time"],
        holdout=r["holdout"],
    )


async def window_samples(db: Database, window_id: int, with_negatives: bool = False) -> list[Sample]:
    """A window's samples with a training signal, in offset order (holdout ones included)."""
    labels = "label <> 0" if with_negatives else "label > 0"
    rows = await db.fetch(
        f"SELECT * FROM samples WHERE window_id = $1 AND {labels} AND weight > 0"
        " ORDER BY source_partition NULLS LAST, source_offset NULLS LAST, event_id",
        window_id,
    )
    return [_sample(r) for r in rows]


async def earlier_samples(
    db: Database, model: str, before_window: int, holdout: bool, limit: int, seed: str
) -> list[tuple[int, Sample]]:
    """Up to ``limit`` desirable samples of the model line's earlier windows, each with its window, in a
    deterministic pseudo-random order: the same ``seed``, the same pick, so a retried job trains and evaluates
    on the same data. ``holdout=False`` gives replay material, ``holdout=True`` the retention evaluation set.
    """
    if limit <= 0:
        return []
    rows = await db.fetch(
        "SELECT * FROM samples WHERE model = $1 AND window_id < $2 AND label > 0 AND weight > 0 AND holdout = $3"
        " ORDER BY md5(event_id || $4) LIMIT $5",
        model,
        before_window,
        holdout,
        seed,
        limit,
    )
    return [(r["window_id"], _sample(r)) for r in rows]


async def earlier_windows(db: Database, model: str, before_window: int) -> int:
    """How many of the line's earlier windows hold replay material."""
    count: int = await db.fetchval(
        "SELECT count(DISTINCT window_id) FROM samples"
        " WHERE model = $1 AND window_id < $2 AND label > 0 AND weight > 0 AND NOT holdout",
        model,
        before_window,
    )
    return count


async def stream_prompts(db: Database, limit: int, seed: str) -> list[str | list[dict[str, str]]]:
    """A deterministic pseudo-random pick of distinct prompts from every stored sample: every model line,
    kind, label and weight (what users ask, whatever their feedback was)."""
    rows = await db.fetch(
        "SELECT prompt FROM (SELECT DISTINCT ON (prompt) prompt, event_id FROM samples ORDER BY prompt, event_id) p"
        " ORDER BY md5(event_id || $1) LIMIT $2",
        seed,
        limit,
    )
    return [r["prompt"] for r in rows]
