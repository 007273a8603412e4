"""Issue 13's training options on a real tiny Llama: replay chosen by loss, orthogonality to the parent's
LoRA A (O-LoRA style), averaging with the parent and anchor rotation (each off by default)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

from streamengine.config.settings import TrainingSettings  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.fisher import FISHER_FILE, load_fisher  # noqa: E402
from streamengine.training.launch import training_command  # noqa: E402
from streamengine.training.orthogonal import OrthogonalPenalty  # noqa: E402
from streamengine.training.recipe import set_up, train  # noqa: E402
from streamengine.training.replay_pick import highest  # noqa: E402
from streamengine.training.rotation import epoch_rows, lines_per_epoch  # noqa: E402
from streamengine.training.spec import Progress, TrainResult, TrainSpec  # noqa: E402
from tests.training_tools import make_spec, run_command, write_samples, write_spec  # noqa: E402

# The parent learns to answer "ok" to "q <word>" (10 steps of batch 8 at lr 0.05: loss 6.0 -> 5.3).
KNOWN: list[tuple[Any, ...]] = [
    (f"q {w}", "ok") for w in ("alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "nu")
]
NEW: list[tuple[Any, ...]] = [("What is 3+3?", "six"), ("Capital of Italy?", "Rome"), ("Opposite of up", "down")]
# The anchor lines four epochs of anchor_per_epoch 2 draw from a pool of 8 (torch.Generator seed 0).
SEEN_IN_FOUR_EPOCHS = [3, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def parent_spec(base: Path, folder: Path, out: Path) -> TrainSpec:
    samples = write_samples(folder / "known.jsonl", KNOWN)
    return make_spec(base, samples, out, epochs=10, batch_size=8, learning_rate=5e-2)


@pytest.fixture(scope="module")
def parent(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("parent")
    train(parent_spec(tiny_base, folder, folder / "v1"))
    return folder / "v1"


def child(base: Path, parent: Path, out: Path, rows: list[tuple[Any, ...]] = NEW, **options: Any) -> TrainSpec:
    spec = make_spec(base, write_samples(out.parent / f"{out.name}.jsonl", rows), out)
    spec.parent_adapter = str(parent)
    for name, value in options.items():
        setattr(spec, name, value)
    return spec


def run(spec: TrainSpec) -> tuple[TrainResult, list[Progress]]:
    records: list[Progress] = []
    return train(spec, progress=records.append), records


@pytest.fixture(scope="module")
def plain(tiny_base: Path, parent: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Progress]]:
    """The child with every option off."""
    out = tmp_path_factory.mktemp("plain") / "v2"
    _, records = run(child(tiny_base, parent, out))
    return out, records


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def overlap(folder: Path, parent: Path) -> float:
    """sum over LoRA layers ||A0 (A - A0)^T||_F^2 of a saved adapter against its parent."""
    a, a0 = tensors(folder), tensors(parent)
    return sum(float((a0[k] @ (a[k] - a0[k]).T).square().sum()) for k in a if "lora_A" in k)


# --- averaging with the parent ------------------------------------------------------------------------


def test_parent_average_saves_the_midpoint_and_measures_it(
    tiny_base: Path, parent: Path, plain: tuple[Path, list[Progress]], tmp_path: Path
) -> None:
    half, _ = run(child(tiny_base, parent, tmp_path / "half", parent_average=0.5))
    trained, before, averaged = tensors(plain[0]), tensors(parent), tensors(tmp_path / "half")
    assert set(averaged) == set(trained) == set(before)
    for name, value in averaged.items():
        assert torch.allclose(value, 0.5 * (before[name] + trained[name]), atol=1e-6, rtol=0), name
    assert max(float((trained[n] - before[n]).abs().max()) for n in trained) > 1e-3  # a real move to halve
    # The Fisher's anchor and the losses after are those of the averaged adapter.
    anchor = load_fisher(tmp_path / "half" / FISHER_FILE).anchor
    assert all(torch.equal(anchor[n], averaged[n]) for n in averaged)
    plain_result = TrainResult.model_validate_json((plain[0] / "result.json").read_text())
    assert half.eval_loss_before == plain_result.eval_loss_before
    assert half.eval_loss_after != plain_result.eval_loss_after
    assert half.train_loss == plain_result.train_loss  # the steps themselves are untouched


def test_without_a_parent_averaging_and_orthogonality_do_nothing(tiny_base: Path, parent: Path, tmp_path: Path) -> None:
    spec = parent_spec(tiny_base, tmp_path, tmp_path / "fresh")
    spec.parent_average, spec.orthogonal_weight = 0.5, 100.0
    _, records = run(spec)
    assert all(r.penalty == 0.0 for r in records)
    fresh, same = tensors(tmp_path / "fresh"), tensors(parent)  # the parent is this spec without the options
    assert all(torch.equal(fresh[n], same[n]) for n in same)


# --- orthogonality to the parent's A ---------------------------------------------------------------------


def test_orthogonal_penalty_value() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "x.lora_A.weight": (3, 8),
        "y.lora_A.weight": (3, 8),
        "z.lora_A.weight": (2, 5),
        "x.lora_B.weight": (8, 3),
    }
    parent = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    params = {n: torch.nn.Parameter(v + 0.1 * torch.randn(v.shape, generator=g)) for n, v in parent.items()}
    penalty = OrthogonalPenalty(params, parent, weight=3.0)
    expected = sum(
        float((parent[n] @ (p.detach() - parent[n]).T).square().sum()) for n, p in params.items() if "lora_A" in n
    )
    value = penalty()
    assert float(value.detach()) == pytest.approx(3.0 * expected, rel=1e-5)
    value.backward()
    assert params["x.lora_B.weight"].grad is None  # B is free
    a, a0 = params["z.lora_A.weight"], parent["z.lora_A.weight"]
    assert torch.allclose(a.grad, 6.0 * (a.detach() - a0) @ a0.T @ a0, atol=1e-5)  # d/dA = 2w (A - A0) A0^T A0
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(parent[name])
        assert float(penalty()) == 0.0


def test_orthogonal_weight_keeps_the_update_of_a_out_of_the_parents_subspace(
    tiny_base: Path, parent: Path, plain: tuple[Path, list[Progress]], tmp_path: Path
) -> None:
    held, records = run(child(tiny_base, parent, tmp_path / "held", orthogonal_weight=100.0))
    assert all(r.penalty == 0.0 for r in plain[1])
    assert records[0].penalty == 0.0  # step 1 starts at the parent
    assert all(r.penalty > 0 for r in records[1:]) and held.ewc_penalty == records[-1].penalty
    assert all(r.loss == pytest.approx(r.task_loss + r.penalty) for r in records)
    # Measured: 0.22 of the unpenalised overlap on this model (3 steps; Adam bounds how far a step goes back).
    assert overlap(tmp_path / "held", parent) < 0.5 * overlap(plain[0], parent)


# --- replay chosen by loss ------------------------------------------------------------------------------


def test_highest_breaks_ties_by_file_order() -> None:
    assert highest([1.0, 3.0, 3.0, 2.0], 2) == [1, 2]
    assert highest([2.0, 2.0, 2.0], 1) == [0]
    assert highest([0.5, 4.0, 1.0], 0) == []


def test_replay_keep_trains_on_the_candidates_the_parent_knows_worst(
    tiny_base: Path, parent: Path, tmp_path: Path
) -> None:
    known = [("q one", "ok"), ("q three", "ok"), ("q five", "ok")]  # the parent's loss: about 5.3
    unknown = [("q two", "banana split"), ("q four", "purple rain"), ("q six", "seven")]  # about 6
    replay = [(*row, 1.0, 1, "replay") for pair in zip(known, unknown, strict=True) for row in pair]
    rows = [*NEW[:2], *replay, ("q rude", "no", 1.0, -1, "replay")]  # e0 e1 window, e2..e7 replay, e8 undesirable
    spec = child(tiny_base, parent, tmp_path / "picked", rows, replay_keep=3)
    setup = set_up(spec)
    assert [e.event_id for e in setup.examples] == ["e0", "e1", "e3", "e5", "e7"]
    assert (setup.replay.candidates, setup.replay.kept) == (6, 3)
    result = train(spec)
    assert (result.replay_candidates, result.replay_kept, result.samples) == (6, 3, 5)
    assert result.replay_pick_seconds > 0
    every = train(child(tiny_base, parent, tmp_path / "every", rows))  # replay_keep None: all stay, none scored
    assert (every.replay_candidates, every.replay_kept, every.samples, every.replay_pick_seconds) == (6, 6, 8, 0.0)
    spec.replay_keep = 0
    assert [e.event_id for e in set_up(spec).examples] == ["e0", "e1"]


def test_epoch_rows_keep_every_other_line_and_draw_the_anchors_afresh_each_epoch() -> None:
    anchors = [3, 4, 5, 6, 7, 8, 9, 10]  # lines 0-2 are window or replay lines
    generator = torch.Generator().manual_seed(0)
    epochs = [epoch_rows(11, anchors, 2, generator) for _ in range(4)]
    for rows in epochs:
        assert rows[:3] == [0, 1, 2] and len(rows) == 5 and set(rows[3:]) <= set(anchors)
    assert sorted({i for rows in epochs for i in rows[3:]}) == SEEN_IN_FOUR_EPOCHS
    again = torch.Generator().manual_seed(0)
    assert [epoch_rows(11, anchors, 2, again) for _ in range(4)] == epochs
    untouched = torch.Generator().manual_seed(0)
    assert epoch_rows(11, anchors, None, untouched) == epoch_rows(11, anchors, 8, untouched) == list(range(11))
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(0).get_state())
    assert (lines_per_epoch(11, anchors, 2), lines_per_epoch(11, anchors, 8), lines_per_epoch(11, [], 2)) == (5, 11, 11)


def test_anchor_rotation_trains_each_epoch_on_a_draw_of_the_pool_and_the_fisher_on_all_of_it(
    tiny_base: Path, tmp_path: Path
) -> None:
    pool = [(f"copy {w}", w, 1.0, 1, "anchor") for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    rows = [*NEW, *pool]
    results = {}
    for per_epoch in (None, 2):
        spec = make_spec(tiny_base, write_samples(tmp_path / "rows.jsonl", rows), tmp_path / f"{per_epoch}",
                         epochs=4, batch_size=5)  # fmt: skip
        spec.ewc.fisher_sources = ["window", "anchor"]
        spec.anchor_per_epoch = per_epoch
        results[per_epoch] = train(spec)
    full, rotated = results[None], results[2]
    assert (full.steps, rotated.steps) == (12, 4)  # 11 lines a epoch in 3 batches of 5; 3 + 2 lines in one
    assert full.samples == rotated.samples == 11
    assert rotated.tokens < full.tokens / 2
    for name in (None, 2):  # the Fisher counts every anchor line of the file, drawn or not
        assert load_fisher(tmp_path / f"{name}" / FISHER_FILE).meta["samples"] == "11"


# --- several processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_pick_the_same_replay_and_train_like_one(tiny_base: Path, parent: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    known, unknown = [("q one", "ok"), ("q three", "ok")], [("q two", "banana split"), ("q four", "purple rain")]
    replay = [(*row, 1.0, 1, "replay") for pair in zip(known, unknown, strict=True) for row in pair]
    options = {"replay_keep": 2, "orthogonal_weight": 100.0, "parent_average": 0.5}
    results = {}
    for processes in (1, 2):
        spec = child(tiny_base, parent, tmp_path / f"p{processes}", [*NEW, *replay], **options)
        code, events, stderr = run_command(
            training_command(write_spec(spec, tmp_path / f"{processes}.json"), processes)
        )
        assert code == 0, stderr[-3000:]
        results[processes] = events[-1]
    one, two = results[1], results[2]
    assert two["processes"] == 2
    for key in ("replay_candidates", "replay_kept", "samples", "steps", "tokens"):
        assert two[key] == one[key], key
    assert (one["replay_candidates"], one["replay_kept"], one["samples"]) == (4, 2, 5)
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], abs=1e-4)
    assert two["ewc_penalty"] == pytest.approx(one["ewc_penalty"], rel=1e-3) and one["ewc_penalty"] > 0
    first, second = tensors(tmp_path / "p1"), tensors(tmp_path / "p2")
    # Float summation order differs between the runs: 1.2e-4 apart at most (measured), the LoRA values up to 0.45.
    assert all(torch.allclose(second[n], first[n], atol=1e-3) for n in first)


# --- gradient clipping (training.max_grad_norm) ------------------------------------------------------------
def _step_norms(spec: TrainSpec) -> list[float]:
    """The L2 norm of the gradient each optimizer step applies."""
    norms: list[float] = []

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(spec)
    finally:
        handle.remove()
    return norms


def test_max_grad_norm_bounds_every_step_and_none_leaves_the_gradient_alone(tiny_base: Path, tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "new.jsonl", NEW)
    free = _step_norms(make_spec(tiny_base, samples, tmp_path / "free", max_grad_norm=None))
    clipped = _step_norms(make_spec(tiny_base, samples, tmp_path / "clipped", max_grad_norm=0.05))
    assert len(free) == len(clipped) == 3
    assert max(free) > 0.1  # the tiny model's raw gradients are larger than the bound
    assert all(n <= 0.05 * (1 + 1e-5) for n in clipped), clipped


# --- the learning-rate schedule (training.lr_schedule, training.warmup_ratio) ----------------------------------
def _step_rates(spec: TrainSpec) -> list[float]:
    """The learning rate each optimizer step applies."""
    rates: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    try:
        train(spec)
    finally:
        handle.remove()
    return rates


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0.0, [1.0] * 12),  # every step at training.learning_rate
        ("constant", 0.25, [0.0, 1 / 3, 2 / 3] + [1.0] * 9),  # 3 of 12 steps warming up from 0
        ("linear", 0.0, [(12 - i) / 12 for i in range(12)]),
        ("cosine", 0.25, [0.0, 1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(9)]),
    ],
)
def test_the_learning_rate_follows_the_schedule(
    tiny_base: Path, tmp_path: Path, schedule: str, warmup: float, expected: list[float]
) -> None:
    samples = write_samples(tmp_path / "new.jsonl", NEW)
    spec = make_spec(tiny_base, samples, tmp_path / "out", epochs=4, batch_size=1, lr_schedule=schedule,
                     warmup_ratio=warmup)  # fmt: skip
    assert _step_rates(spec) == pytest.approx([1e-2 * e for e in expected])


def test_a_schedule_or_warmup_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingSettings(lr_schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingSettings(warmup_ratio=1.0)
