"""The benchmark's rows, training settings and one run (a base, a data seed, a case): see ``__main__``."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.forgetting import report
from bench.forgetting.base import score
from bench.forgetting.methods import ATTENTION, MLP, Method, Run, run_joint, run_method, shipped
from bench.forgetting.tasks import WINDOWS, Item, base_items, window_items
from streamengine.config.settings import EwcSettings, LearningSettings
from streamengine.training import self_anchor

LAMBDA, REPLAY = EwcSettings().lambda_, 0.25
EWC_REPLAY = Method(lam=LAMBDA, replay=REPLAY)  # the configuration before self anchors
ANCHORED = replace(EWC_REPLAY, anchor=0.1, anchor_min=16)
MAGPIE = replace(ANCHORED, anchors="magpie")  # self anchors from the base's own prompts: the default before step 2
SCALED = replace(MAGPIE, scaling="windows")
NEW_DEFAULT = replace(SCALED, anchor=0.2, clip=1.0)  # the scaled share, clipped, more anchors: the default of 5 Dec
FISHER_ANCHOR = replace(NEW_DEFAULT, fisher=("window", "anchor"))  # and the Fisher of the anchor lines
QV_UPDOWN = ("q_proj", "v_proj", "up_proj", "down_proj")  # LoRA on attention and MLP, as many modules as q/k/v/o
QV_UPDOWN_R45 = replace(FISHER_ANCHOR, targets=QV_UPDOWN, replay_max=0.45)  # the default of 5 Dec 2026, 14:00
ROTATION = replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True)  # the default of 5 Dec 2026, 20:00
ROWS: dict[str, Method] = {
    "naive": Method(),
    "replay": Method(replay=REPLAY),
    "ewc+replay": EWC_REPLAY,
    "+magpie": MAGPIE,
    "+magpie+distill": replace(ANCHORED, anchors="magpie", distill=1.0),
    "+magpie a0.2": replace(ANCHORED, anchor=0.2, anchors="magpie"),
    "+magpie r0.5": replace(ANCHORED, replay=0.5, anchors="magpie"),
    # Replay: how much (per earlier window, at most half the job) and which (balanced, or by the parent's loss);
    # then, on top of the scaled replay: more anchors, distillation, averaging with the parent (a quarter of the
    # parent) and O-LoRA-style orthogonality of the A update.
    "+scaled": SCALED,
    "+balanced": replace(MAGPIE, selection="balanced"),
    "+scaled+balanced": replace(SCALED, selection="balanced"),
    "+scaled+loss": replace(SCALED, selection="loss"),
    "+scaled a0.2": replace(SCALED, anchor=0.2),
    "+scaled+distill": replace(SCALED, distill=1.0),
    "+scaled+average": replace(SCALED, extra={"parent_average": 0.25}),
    "+scaled+orthogonal": replace(SCALED, extra={"orthogonal_weight": 1.0}),
    # Both replay shares with every step's gradient clipped to norm 1 (training.max_grad_norm).
    "+magpie clip": replace(MAGPIE, clip=1.0),
    "+scaled clip": replace(SCALED, clip=1.0),
    # The scaled share, clipped, with more anchors (the most base skill kept in `facts` on the screen: a0.2).
    "+scaled a0.2 clip": NEW_DEFAULT,
    "+scaled a0.3 clip": replace(SCALED, anchor=0.3, clip=1.0),
    # On top of it: the Fisher also of the anchor lines (the penalty then holds what the base skill needs), of
    # every line, a stronger penalty, distillation toward the base.
    "+fisher anchor": FISHER_ANCHOR,
    # On top of that: a self-anchor set four times as large (learning.self_anchor.samples 1024).
    "+fisher anchor set x4": replace(FISHER_ANCHOR, anchor_scale=4),
    # More anchors in the same job size: the anchor share up, the most replay down (later jobs stay 3.3x the window).
    "+fisher anchor a0.3 r0.4": replace(FISHER_ANCHOR, anchor=0.3, replay_max=0.4),
    "+fisher anchor a0.25 r0.45": replace(FISHER_ANCHOR, anchor=0.25, replay_max=0.45),
    "+fisher all": replace(FISHER_ANCHOR, fisher=("window", "replay", "anchor")),
    "+lambda 2000": replace(NEW_DEFAULT, lam=2000.0),
    "+fisher anchor lambda 1000": replace(FISHER_ANCHOR, lam=1000.0),
    "+fisher anchor lambda 2000": replace(FISHER_ANCHOR, lam=2000.0),
    "+fisher all lambda 2000": replace(FISHER_ANCHOR, lam=2000.0, fisher=("window", "replay", "anchor")),
    "+fisher anchor a0.3": replace(FISHER_ANCHOR, anchor=0.3),
    # The window's and the anchors' Fisher each half of the importance (ewc.fisher_balance: sources); with the
    # replay lines, a third each; with a stronger or weaker penalty.
    "+fisher balanced": replace(FISHER_ANCHOR, balance="sources"),
    "+fisher all balanced": replace(FISHER_ANCHOR, fisher=("window", "replay", "anchor"), balance="sources"),
    "+fisher balanced lambda 250": replace(FISHER_ANCHOR, balance="sources", lam=250.0),
    "+fisher balanced lambda 1000": replace(FISHER_ANCHOR, balance="sources", lam=1000.0),
    # LoRA on the MLP projections (lora.target_modules): room for facts outside the attention that copies. Every
    # linear layer, the MLP only, q/v with up/down (the count of q/k/v/o), q/k/v/o with down; then with the most
    # replay at 0.45 (the default of 5 Dec 2026, 14:00: QV_UPDOWN, r0.45) and r0.45 alone.
    "+fisher anchor mlp": replace(FISHER_ANCHOR, targets=ATTENTION + MLP),
    "+fisher anchor mlp only": replace(FISHER_ANCHOR, targets=MLP),
    "+fisher anchor qv updown": replace(FISHER_ANCHOR, targets=QV_UPDOWN),
    "+fisher anchor down": replace(FISHER_ANCHOR, targets=(*ATTENTION, "down_proj")),
    "+fisher anchor r0.45": replace(FISHER_ANCHOR, replay_max=0.45),
    "+fisher anchor qv updown r0.45": QV_UPDOWN_R45,
    # On top of it: anchors weighing twice (the default of 5 Dec 2026, 17:00: learning.anchor_weight 2) or thrice
    # in the loss and the Fisher (no more samples); more anchors in a job of that size or a little larger; a
    # stronger penalty; distillation; the LoRA on v/o instead of q/v (q and k, where attention looks, untouched).
    "+qv updown aw2": replace(QV_UPDOWN_R45, anchor_weight=2.0),
    "+qv updown aw3": replace(QV_UPDOWN_R45, anchor_weight=3.0),
    "+qv updown a0.3 r0.4": replace(QV_UPDOWN_R45, anchor=0.3, replay_max=0.4),
    "+qv updown a0.3 r0.35": replace(QV_UPDOWN_R45, anchor=0.3, replay_max=0.35),
    "+qv updown aw2 a0.25 r0.4": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor=0.25, replay_max=0.4),
    "+qv updown aw2 spread": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_spread=True),
    "+qv updown lambda 1000": replace(QV_UPDOWN_R45, lam=1000.0),
    "+qv updown distill 0.5": replace(QV_UPDOWN_R45, distill=0.5),
    # Anchor rotation (learning.anchor_rotation; the default of 5 Dec 2026, 20:00: +aw2 rotation): the job holds
    # the whole anchor pool and each epoch trains on a fresh draw of as many as it would have picked, so it sees
    # nearly every anchor at the same step count; with more anchors, or the anchors weighing 1, 1.5 or 1.75; a pool
    # of twice the pick instead of the whole; a weaker or stronger penalty (the newest `shared` window, Step 2).
    "+aw2 rotation": ROTATION,
    "+aw2 rotation a0.25 r0.4": replace(
        QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, anchor=0.25, replay_max=0.4
    ),
    "+rotation aw1": replace(QV_UPDOWN_R45, anchor_rotation=True),
    "+rotation aw1.5": replace(QV_UPDOWN_R45, anchor_weight=1.5, anchor_rotation=True),
    "+rotation aw1.75": replace(QV_UPDOWN_R45, anchor_weight=1.75, anchor_rotation=True),
    "+aw2 rotation pool2": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, rotation_pool=2),
    "+aw2 rotation lambda 250": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, lam=250.0),
    "+aw2 rotation lambda 1000": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, lam=1000.0),
    # The parent's Fisher decayed (ewc.gamma), and anchors weighing 1.75 with a stronger penalty: the newest `shared`
    # window with `facts`' base skill (Step 2, "Online-EWC decay"; neither kept).
    "+aw2 rotation gamma 0.5": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, gamma=0.5),
    "+aw2 rotation gamma 0.8": replace(QV_UPDOWN_R45, anchor_weight=2.0, anchor_rotation=True, gamma=0.8),
    "+rotation aw1.75 lambda 1000": replace(QV_UPDOWN_R45, anchor_weight=1.75, anchor_rotation=True, lam=1000.0),
    "+fisher anchor vo updown r0.45": replace(QV_UPDOWN_R45, targets=("v_proj", "o_proj", "up_proj", "down_proj")),
    "naive mlp": Method(targets=ATTENTION + MLP),
    "ewc+replay mlp": replace(EWC_REPLAY, targets=ATTENTION + MLP),
    "+clip distill": replace(NEW_DEFAULT, distill=1.0),
    # The other anchor sources in the default's place (Magpie): a curated set, a prompt-only file, the stream.
    "+scaled+true": replace(SCALED, anchors="true"),
    "+scaled+prompts": replace(SCALED, anchors="prompts"),
    "+scaled+stream": replace(SCALED, anchors="stream"),
    # The learning rate warming up over a tenth of each job, then decaying along a cosine (training.lr_schedule,
    # training.warmup_ratio; the default of 6 Dec 2026, 11:00): a job's first steps move the parent less, its
    # last ones settle it.
    "+cosine": replace(ROTATION, schedule="cosine", warmup=0.1),
    "default": shipped(),
}
# One job on every window (the upper bound for the windows): epochs and learning rate as multiples of the case's.
JOINT: dict[str, tuple[int, float]] = {"joint": (1, 1.0), "joint-long": (2, 1.0), "joint-slow": (2, 1 / 3)}
MAIN_ROWS = "naive,ewc+replay,default,joint"
# The benchmark's training settings (the same for every method): chosen so naive learns the newest window on
# every base and joint is stable (Step 0). `shared` at 24 epochs of 3e-3 left naive at 0.86 on base 2, and
# `joint` collapsed on some `conflict` runs at 3e-3 (6 Dec 2026: both at 32 epochs of 2e-3; `facts` stays,
# `joint` fell to 0.85 on one of its runs there).
TRAINING: dict[str, dict[str, Any]] = {
    "conflict": {"batch_size": 16, "learning_rate": 2e-3, "epochs": 32},
    "shared": {"batch_size": 16, "learning_rate": 2e-3, "epochs": 32},
    "facts": {"batch_size": 16, "learning_rate": 3e-3, "epochs": 20},
}
SIZES = {"train_n": 96, "holdout_n": 32, "facts_n": 16, "copies": 8, "anchor_set": 128}
QUICK_SIZES = {"train_n": 32, "holdout_n": 16, "facts_n": 8, "copies": 2, "anchor_set": 32}


def anchor_set(source: str, base: Path, windows: list[Any], seed: int, size: int) -> tuple[list[Item], dict[str, Any]]:
    """The anchor items of ``source`` for this base (and, for the stream, this run's first window)."""
    if source == "none":
        return [], {}
    if source == "true":
        return base_items(random.Random(seed + 3), size, set()), {}
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    given: dict[str, list[self_anchor.Prompt]] = {}
    settings = LearningSettings().self_anchor
    if source == "prompts":
        given["prompts"] = [p for p, _ in base_items(random.Random(seed + 5), size, set())]
    if source == "stream" or (source == "self" and settings.stream_prompts):
        first = windows[0].train + windows[0].holdout
        given["stream"] = [p for p, _ in first][: settings.stream_prompts or size]
    magpie = source == "magpie" or (source == "self" and settings.magpie)
    started = time.monotonic()
    built = self_anchor.build(
        model, tok, given, size, self_anchor.Filters(settings.min_chars, settings.max_repeat),
        max_new_tokens=24, temperature=settings.temperature, seed=seed, magpie=magpie,
    )  # fmt: skip
    pairs = [(str(p), c) for p, c in built.pairs]
    info = {"seconds": time.monotonic() - started, "size": len(pairs), "sources": built.sources}
    return pairs, {**info, "dropped": built.dropped, "correct": _correct(base, pairs)}


def _correct(base: Path, pairs: list[Item]) -> float:
    """Share of the pairs that are true base-skill items (a well-formed prompt and its right answer)."""
    right = sum(
        1 for p, c in pairs if (p.startswith("copy ") and c == p[5:]) or (p.startswith("low ") and c == p[4:].lower())
    )
    return right / max(len(pairs), 1)


def one_run(base: Path, case: str, seed: int, rows: list[str], sizes: dict[str, int]) -> dict[str, Any]:
    """Every row on one base, case and data seed."""
    windows = window_items(case, seed + 11, sizes["train_n"], sizes["holdout_n"], sizes["facts_n"], sizes["copies"])
    base_holdout = base_items(random.Random(seed + 7), sizes["holdout_n"] * 2, set())
    training = {**TRAINING[case], "seed": seed}
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    before = score(model, tok, base_holdout)
    out: dict[str, Any] = {}
    sets: dict[str, tuple[list[Item], list[Item], dict[str, Any]]] = {}

    def anchors_of(source: str, scale: int) -> tuple[list[Item], list[Item], dict[str, Any]]:
        key = f"{source} x{scale}"
        if key not in sets:  # built once per run, source and size: the pool and the gate's half
            pairs, info = anchor_set(source, base, windows, seed, 2 * sizes["anchor_set"] * scale)
            sets[key] = pairs[::2], pairs[1::2], info
        return sets[key]

    for name in rows:
        method = ROWS.get(name, Method(joint=True))
        pool, gate, built = anchors_of(method.anchors if method.anchors != "none" else "magpie", method.anchor_scale)
        run = Run(base, windows, base_holdout, training, gate)
        if method.joint:
            epochs, lr = JOINT[name]
            result = run_joint(run, training["epochs"] * epochs, training["learning_rate"] * lr)
        else:
            result = {**run_method(run, method, pool if method.anchors != "none" else []), "anchor_set": built}
        summary = report.summarise(result["final"], WINDOWS)
        summary.update({f"base_{m}_before": before[m] for m in report.MEASURES})
        summary["seconds_per_job"] = sum(j["seconds"] for j in result["jobs"]) / len(result["jobs"])
        out[name] = {**result, "summary": summary}
        print(f"{case} {base.name} seed {seed} {name}: " + json.dumps({k: round(v, 3) for k, v in summary.items()}),
              flush=True)  # fmt: skip
    return out


def unit(base: Path, seed: int, case: str, rows: list[str], sizes: dict[str, int]) -> dict[str, Any]:
    """One base (its folder, pretrained before the units start: a code change during the run cannot make a
    worker build another), data seed and case, in a worker process of one thread (on a shared machine one
    thread per process wastes least; results do not depend on the number of processes)."""
    torch.set_num_threads(1)
    return one_run(base, case, seed, rows, sizes)
