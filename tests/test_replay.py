"""Replay: how much of a job (fixed, or per earlier window) and which earlier samples (uniform, balanced, loss).

The pure rules (:mod:`streamengine.core.replay`), then the job's samples file that the worker writes from
real PostgreSQL rows (:func:`streamengine.jobs.dataset.prepare`) under each setting.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streamengine.config.settings import LearningSettings, Settings
from streamengine.core.replay import CANDIDATES_PER_SAMPLE, pick_balanced, replay_share
from streamengine.core.samples import is_holdout
from streamengine.jobs import dataset
from streamengine.store.db import Database


def test_replay_share_fixed_or_per_earlier_window_up_to_the_ceiling() -> None:
    assert [replay_share(0.25, k, "fixed", 0.5) for k in range(4)] == [0.0, 0.25, 0.25, 0.25]
    assert [replay_share(0.25, k, "windows", 0.5) for k in range(4)] == [0.0, 0.25, 0.5, 0.5]
    assert replay_share(0.1, 3, "windows", 0.5) == pytest.approx(0.3)


def _facts(windows: int, facts: int, copies: int) -> list[tuple[int, str]]:
    """(window, prompt) of ``facts`` distinct prompts per window, each sent ``copies`` times, shuffled."""
    items = [(w, f"fact {w}-{f}") for w in range(windows) for f in range(facts) for _ in range(copies)]
    return random.Random(0).sample(items, len(items))


def test_balanced_replays_every_prompt_once_before_any_twice_and_the_windows_in_turn() -> None:
    pool = _facts(3, 16, 8)  # the forgetting benchmark's facts case at its fourth window
    n = 49
    uniform = pool[:n]
    balanced = pick_balanced(pool, n, lambda c: c[0], lambda c: c[1])
    assert len({p for _, p in uniform}) == 33  # a uniform pick leaves 15 of the 48 facts out
    assert len({p for _, p in balanced}) == 48  # balanced: all of them, one repeated
    assert sorted(Counter(w for w, _ in balanced[:48]).values()) == [16, 16, 16]
    assert [w for w, _ in balanced[:6]] == [0, 1, 2, 0, 1, 2]  # windows in turn
    assert pick_balanced(pool, 0, lambda c: c[0], lambda c: c[1]) == []
    assert len(pick_balanced(pool[:10], 50, lambda c: c[0], lambda c: c[1])) == 10


def test_replay_settings_are_validated_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="max_replay_fraction"):
        LearningSettings(replay_scaling="windows", max_replay_fraction=0.9, anchor_fraction=0.1)
    with pytest.raises(ValueError, match="replay_selection"):
        LearningSettings(replay_selection="newest")
    LearningSettings(replay_scaling="fixed", max_replay_fraction=0.9, anchor_fraction=0.1)  # unused ceiling


# --- the job's samples file from real rows ------------------------------------------------------------------
WINDOW_FACTS, COPIES = 16, 4


async def _line_with_windows(db: Database, model: str, windows: int) -> list[int]:
    """``windows`` windows of ``model``: each ``WINDOW_FACTS`` facts sent ``COPIES`` times; the ids."""
    await db.execute("INSERT INTO model_lines (model) VALUES ($1)", model)
    ids = []
    for w in range(windows):
        window_id = await db.fetchval("INSERT INTO windows (model, state) VALUES ($1, 'closed') RETURNING id", model)
        rows = [
            (f"w{w}-f{f}-c{c}", model, window_id, "correction", json.dumps(f"fact {w}-{f}"), f"v{w}-{f}", 1.0, 1)
            for f in range(WINDOW_FACTS)
            for c in range(COPIES)
        ]
        for row in rows:
            await db.execute(
                "INSERT INTO samples (event_id, model, window_id, kind, prompt, completion, weight, label)"
                " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
                *row,
            )
        ids.append(window_id)
    await db.execute("UPDATE samples SET holdout = false")  # every sample trains (the test counts them)
    return ids


async def _replay_lines(settings: Settings, db: Database, window_id: int, folder: Path) -> tuple[list[Any], Any]:
    await asyncio.to_thread(folder.mkdir)
    data = await dataset.prepare(db, settings, 7, settings.model.name, window_id, folder)
    text = await asyncio.to_thread(data.samples_path.read_text)
    lines = [json.loads(line) for line in text.splitlines()]
    return [line for line in lines if line["source"] == "replay"], data


@pytest.mark.integration
async def test_job_replay_under_each_setting(make_settings, tmp_path) -> None:
    base = {"min_holdout_samples": 0, "anchor_fraction": 0.0, "anchor_min_samples": 0}
    fixed = make_settings(learning={**base, "replay_scaling": "fixed"})
    db = await Database.connect(fixed.database)
    try:
        ids = await _line_with_windows(db, fixed.model.name, 4)
        window = WINDOW_FACTS * COPIES  # the fourth window's training samples
        uniform, data = await _replay_lines(fixed, db, ids[3], tmp_path / "uniform")
        assert len(uniform) == round(0.25 * window / 0.75) and data.replay_keep is None
        assert data.counts["replay"] == len(uniform)

        scaled = make_settings(
            learning={**base, "replay_scaling": "windows", "max_replay_fraction": 0.5, "replay_selection": "balanced"}
        )
        balanced, data = await _replay_lines(scaled, db, ids[3], tmp_path / "balanced")
        assert len(balanced) == window  # min(0.5, 0.25 x 3 earlier windows) of the job: as many as the window
        prompts = Counter(line["prompt"] for line in balanced)
        assert len(prompts) == 3 * WINDOW_FACTS and set(prompts.values()) == {COPIES // 3, COPIES // 3 + 1}
        assert len({line["prompt"] for line in uniform}) < len(uniform)  # uniform repeats prompts it could skip
        second, _ = await _replay_lines(scaled, db, ids[1], tmp_path / "second")  # one earlier window
        assert len(second) == round(0.25 * window / 0.75)

        by_loss = make_settings(learning={**base, "replay_scaling": "fixed", "replay_selection": "loss"})
        candidates, data = await _replay_lines(by_loss, db, ids[3], tmp_path / "loss")
        assert data.replay_keep == len(uniform)  # the trainer keeps as many as a uniform pick replays
        assert len(candidates) == min(CANDIDATES_PER_SAMPLE * len(uniform), 3 * window)
    finally:
        await db.close()


async def _prepare_each(settings: dict[str, Settings], anchors: Path, tmp_path: Path) -> dict[str, dataset.JobData]:
    """Job 7's data for one window of a fresh line, under each of ``settings`` (one folder per name)."""
    first = next(iter(settings.values()))
    db = await Database.connect(first.database)
    try:
        window_id = (await _line_with_windows(db, first.model.name, 1))[0]
        data = {}
        for name, cfg in settings.items():
            await asyncio.to_thread((tmp_path / name).mkdir)
            data[name] = await dataset.prepare(db, cfg, 7, cfg.model.name, window_id, tmp_path / name,
                                               anchor_path=anchors)  # fmt: skip
        return data
    finally:
        await db.close()


def _lines_of(path: Path, source: str) -> list[dict[str, Any]]:
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["source"] == source]


@pytest.mark.integration
async def test_job_anchor_lines_weigh_learning_anchor_weight_times_their_own(make_settings, tmp_path) -> None:
    """``learning.anchor_weight`` scales the anchors' training lines only: the gate's anchor check keeps the
    set's own weights (a weighted mean is the same under a common factor, but the file says what was given)."""
    anchors = tmp_path / "anchors.jsonl"
    items = [{"prompt": f"copy w{i}", "completion": f"w{i}", **({"weight": 0.5} if i % 2 else {})} for i in range(64)]
    anchors.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    base = {"min_holdout_samples": 0, "anchor_fraction": 0.2, "anchor_min_samples": 0, "anchor_path": str(anchors)}
    base["anchor_rotation"] = False  # the picked anchors only (rotation: tested below)
    plain, heavy = (make_settings(learning={**base, "anchor_weight": w}) for w in (1.0, 3.0))
    data = await _prepare_each({"plain": plain, "heavy": heavy}, anchors, tmp_path)
    own = {f"copy w{i}": item.get("weight", 1.0) for i, item in enumerate(items)}
    trained = {name: _lines_of(d.samples_path, "anchor") for name, d in data.items()}
    assert len(trained["heavy"]) == data["heavy"].counts["anchor"] == round(0.2 * WINDOW_FACTS * COPIES / 0.8)
    assert [r["event_id"] for r in trained["heavy"]] == [r["event_id"] for r in trained["plain"]]  # same pick
    assert {r["weight"] for r in trained["heavy"]} == {1.5, 3.0}
    assert all(r["weight"] == 3.0 * own[json.loads(r["prompt"])] for r in trained["heavy"])
    assert all(r["weight"] == own[json.loads(r["prompt"])] for r in trained["plain"])
    window = _lines_of(data["heavy"].samples_path, "window")
    assert window and {r["weight"] for r in window} == {1.0}  # the window's samples keep theirs
    checked = _lines_of(data["heavy"].eval_sets["anchor"], "anchor")
    assert checked and all(r["weight"] == own[json.loads(r["prompt"])] for r in checked)


@pytest.mark.integration
async def test_anchor_rotation_puts_the_whole_pool_in_the_job_and_the_picked_count_in_the_spec(
    make_settings, tmp_path
) -> None:
    """``learning.anchor_rotation``: the samples file holds every pool anchor (the gate's half stays out) and
    ``anchor_per_epoch`` is how many the share picks."""
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"prompt": f"copy w{i}", "completion": f"w{i}"}) + "\n" for i in range(64)))
    base = {"min_holdout_samples": 0, "anchor_fraction": 0.2, "anchor_min_samples": 0, "anchor_path": str(anchors)}
    picked, rotated = (make_settings(learning={**base, "anchor_rotation": on}) for on in (False, True))
    data = await _prepare_each({"picked": picked, "rotated": rotated}, anchors, tmp_path)

    def anchor_ids(path: Path) -> list[str]:
        return [row["event_id"] for row in _lines_of(path, "anchor")]

    share = round(0.2 * WINDOW_FACTS * COPIES / 0.8)
    pool = [f"anchor-{n}" for n in range(1, 65) if not is_holdout(f"anchor-{n}", 0.5)]
    few, every = anchor_ids(data["picked"].samples_path), anchor_ids(data["rotated"].samples_path)
    assert len(few) == share < len(pool) and data["picked"].anchor_per_epoch is None
    assert sorted(every) == sorted(pool) and data["rotated"].anchor_per_epoch == share
    assert data["rotated"].counts["anchor"] == len(pool) and data["rotated"].counts["anchor_per_epoch"] == share
    assert "anchor_per_epoch" not in data["picked"].counts
    assert set(anchor_ids(data["rotated"].eval_sets["anchor"])).isdisjoint(every)
