"""The methods: four windows trained one after another as real jobs (``recipe.train``), or jointly.

Each job's samples file mixes the window, replay of earlier windows' training samples and anchor samples
in the shares the worker uses (:func:`streamengine.jobs.dataset.job_mix`); EWC reads the parent's
``fisher.safetensors``; distillation and the other options go in through the job's spec, as the worker's do.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.forgetting.base import MAX_LENGTH, score
from bench.forgetting.tasks import Item, Window, write_jsonl
from streamengine.config.settings import EwcSettings, LearningSettings, LoraSettings, TrainingSettings
from streamengine.core.replay import CANDIDATES_PER_SAMPLE, ReplayScaling, ReplaySelection, pick_balanced, replay_share
from streamengine.jobs.dataset import job_mix
from streamengine.training.recipe import train
from streamengine.training.spec import TrainSpec

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    lam: float = 0.0  # EWC lambda (sum units)
    gamma: float = 1.0  # ewc.gamma: each job's decay of the parent's importances (online EWC)
    replay: float = 0.0  # replay share of each job's samples (per earlier window with scaling "windows")
    scaling: ReplayScaling = "fixed"
    replay_max: float = 0.5  # the largest replay share with scaling "windows"
    selection: ReplaySelection = "uniform"
    anchor: float = 0.0  # anchor share of each job's samples
    anchor_min: int = 0  # fewest anchor samples per job
    anchors: str = "none"  # none | true (a curated set) | prompts | stream | magpie | self (the shipped sources)
    distill: float = 0.0  # weight of the KL to the base on anchor samples
    joint: bool = False
    clip: float | None = None  # training.max_grad_norm of every job (None: no clipping)
    schedule: str = "constant"  # training.lr_schedule of every job
    warmup: float = 0.0  # training.warmup_ratio of every job
    fisher: tuple[str, ...] = ("window",)  # ewc.fisher_sources: the sample lines the Fisher is computed on
    balance: str = "pooled"  # ewc.fisher_balance: pooled, or each source an equal share of the importance
    targets: tuple[str, ...] = ATTENTION  # lora.target_modules
    anchor_weight: float = 1.0  # each anchor sample's weight in the loss and Fisher (the window's are 1)
    anchor_spread: bool = False  # every pool anchor in every job, weighing as much in all as the job's share
    anchor_rotation: bool = False  # learning.anchor_rotation: the whole pool in the job, a fresh draw each epoch
    rotation_pool: int = 0  # with rotation, the pool as a multiple of the pick (0: the whole anchor pool)
    anchor_scale: int = 1  # the self-anchor set's size as a multiple of the benchmark's (sizes["anchor_set"])
    extra: dict[str, Any] = field(default_factory=dict)  # more TrainSpec fields


def shipped() -> Method:
    """The shipped configuration (no user anchor set, no prompt file): the settings' defaults."""
    learning, ewc, training, lora = LearningSettings(), EwcSettings(), TrainingSettings(), LoraSettings()
    anchors = "self" if learning.self_anchor.enabled else "none"
    extra = {"parent_average": learning.parent_average, "orthogonal_weight": learning.orthogonal_weight}
    return Method(
        lam=ewc.lambda_,
        gamma=ewc.gamma,
        replay=learning.replay_fraction,
        scaling=learning.replay_scaling,
        replay_max=learning.max_replay_fraction,
        selection=learning.replay_selection,
        anchor=learning.anchor_fraction,
        anchor_min=learning.anchor_min_samples,
        anchors=anchors,
        distill=learning.distill.weight,
        clip=training.max_grad_norm,
        schedule=training.lr_schedule,
        warmup=training.warmup_ratio,
        fisher=tuple(ewc.fisher_sources),
        balance=ewc.fisher_balance,
        targets=tuple(lora.target_modules),
        anchor_weight=learning.anchor_weight,
        anchor_rotation=learning.anchor_rotation,
        extra={k: v for k, v in extra.items() if v},
    )


@dataclass(frozen=True)
class Run:
    """One benchmark run's inputs."""

    base: Path
    windows: list[Window]
    base_holdout: list[Item]
    training: dict[str, Any]  # the benchmark's TrainingSettings (epochs, lr, batch size, seed)
    gate: list[Item]  # the anchor set's held-out half: what the release gate scores (at the base, before, after)


def run_method(run: Run, method: Method, anchors: list[Item]) -> dict[str, Any]:
    """Train the windows in order (each job continues from the previous adapter and Fisher); score the last."""
    rng = random.Random(run.training["seed"])
    parent: Path | None = None
    jobs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="forgetting-") as scratch:
        work = Path(scratch)
        for k, window in enumerate(run.windows):
            share = replay_share(method.replay, k, method.scaling, method.replay_max)
            n_replay, n_anchor = job_mix(len(window.train), share, method.anchor if anchors else 0.0,
                                         method.anchor_min)  # fmt: skip
            replay, keep = _replay(rng, run.windows[:k], n_replay, method.selection)
            rows = [(item, "window") for item in window.train] + [(item, "replay") for item in replay]
            picked, spec = rng.sample(anchors, min(len(anchors), n_anchor)), method
            if method.anchor_spread and picked:  # the whole pool, weighing in all what the picked anchors would
                picked, spec = anchors, replace(method, anchor_weight=method.anchor_weight * len(picked) / len(anchors))
            if method.anchor_rotation and picked:  # the whole pool, as many of it each epoch as were picked
                spec = replace(spec, extra={**spec.extra, "anchor_per_epoch": len(picked)})
                pool = method.rotation_pool * len(picked)
                picked = rng.sample(anchors, min(pool, len(anchors))) if pool else anchors
            rows += [(item, "anchor") for item in picked]
            out = work / f"v{k + 1}"
            keep_spec = replace(spec, extra={**spec.extra, "replay_keep": keep}) if keep is not None else spec
            jobs.append(_job(run, keep_spec, rows, out, parent, work / f"train{k + 1}.jsonl"))
            jobs[-1]["scores"] = evaluate(run, out)  # every window and the base after each job: where a run fell
            parent = out
        assert parent is not None
        final = evaluate(run, parent)
    return {"final": final, "jobs": jobs}


def _replay(
    rng: random.Random, earlier: list[Window], n: int, selection: ReplaySelection
) -> tuple[list[Item], int | None]:
    """The replay rows as the worker picks them (:func:`streamengine.jobs.dataset.prepare`): a pseudo-random
    order of the earlier windows' training samples, then uniform, balanced or loss (candidates, ``n`` kept)."""
    pool = [(w, item) for w, window in enumerate(earlier) for item in window.train]
    if not pool or n <= 0:
        return [], None
    if selection == "uniform":
        return rng.sample([item for _, item in pool], min(len(pool), n)), None
    ordered = rng.sample(pool, len(pool))
    candidates = ordered[: n * CANDIDATES_PER_SAMPLE]
    if selection == "balanced":
        return [item for _, item in pick_balanced(candidates, n, lambda c: c[0], lambda c: c[1][0])], None
    return [item for _, item in candidates], min(n, len(candidates))


def run_joint(run: Run, epochs: int, learning_rate: float) -> dict[str, Any]:
    """One job on every window's training samples (the upper bound for the windows)."""
    rows = [(item, "window") for window in run.windows for item in window.train]
    with tempfile.TemporaryDirectory(prefix="forgetting-") as scratch:
        work = Path(scratch)
        joint = replace(run, training={**run.training, "epochs": epochs, "learning_rate": learning_rate})
        job = _job(joint, Method(joint=True), rows, work / "joint", None, work / "joint.jsonl")
        final = evaluate(run, work / "joint")
    return {"final": final, "jobs": [job]}


def _job(run: Run, method: Method, rows: list[tuple[Item, str]], out: Path, parent: Path | None,
         samples: Path) -> dict[str, Any]:  # fmt: skip
    """One training job; returns its seconds, last epoch's loss, last step's penalty and the gate's anchor set
    losses (at the base, before, after)."""
    gate = write_jsonl(samples.with_name("gate.jsonl"), [(item, "anchor") for item in run.gate])
    spec = TrainSpec(
        base_model=str(run.base),
        parent_adapter=str(parent) if parent else None,
        parent_fisher=str(parent / "fisher.safetensors") if parent and method.lam > 0 else None,
        samples_path=write_jsonl(samples, rows, {"anchor": method.anchor_weight}),
        output_dir=str(out),
        lora={**LORA, "target_modules": list(method.targets)},
        training={
            **run.training,
            "max_length": MAX_LENGTH,
            "device": "cpu",
            "max_grad_norm": method.clip,
            "lr_schedule": method.schedule,
            "warmup_ratio": method.warmup,
        },
        ewc={
            "lambda": method.lam,
            "gamma": method.gamma,
            "fisher_sources": list(method.fisher),
            "fisher_balance": method.balance,
        },
        distill={"weight": method.distill},
        compute_fisher=method.lam > 0,
        eval_sets={"anchor": gate},
        base_sets=["anchor"],
        **method.extra,
    )
    result = train(spec)
    return {"seconds": result.seconds, "train_loss": result.train_loss, "ewc_penalty": result.ewc_penalty,
            "anchor": result.eval["anchor"]}  # fmt: skip


def evaluate(run: Run, adapter: Path) -> dict[str, dict[str, float]]:
    tok = AutoTokenizer.from_pretrained(run.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), adapter)
    out = {f"w{k + 1}": score(model, tok, window.holdout) for k, window in enumerate(run.windows)}
    out["base"] = score(model, tok, run.base_holdout)
    return out
