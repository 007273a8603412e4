"""The EWC penalty: its value and gradient, the parent's file, and its place in the recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.ewc import EwcPenalty  # noqa: E402
from streamengine.training.fisher import FISHER_FILE, FisherState, load_fisher, save_fisher  # noqa: E402
from streamengine.training.launch import training_command  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from streamengine.training.spec import Progress, TrainSpec  # noqa: E402
from tests.training_tools import make_spec, run_command, write_samples, write_spec  # noqa: E402

ROWS: list[tuple[Any, ...]] = [
    ("What is 2+2?", "4"),
    ("Capital of France?", "Paris", 2.0),
    ("Name a fruit", "apple"),
    ("Opposite of hot", "cold"),
]
NEW_ROWS: list[tuple[Any, ...]] = [
    ("What is 3+3?", "six"),
    ("Capital of Italy?", "Rome"),
    ("Name a colour", "teal"),
    ("Opposite of up", "down"),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def state_for(params: dict[str, torch.nn.Parameter], seed: int = 0) -> FisherState:
    g = torch.Generator().manual_seed(seed)
    importance = {n: torch.rand(p.shape, generator=g) * 3 for n, p in params.items()}
    anchor = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    return FisherState(importance, anchor, {"format": "streamengine.fisher/1", "normalize": "mean"})


def test_penalty_value_and_gradient() -> None:
    params = {
        "x.lora_A.weight": torch.nn.Parameter(torch.randn(3, 4)),
        "x.lora_B.weight": torch.nn.Parameter(torch.randn(5, 3)),
    }
    state = state_for(params)
    penalty = EwcPenalty(params, state, lam=250.0)
    value = penalty()
    expected = (
        sum(float((state.importance[n] * (p.detach() - state.anchor[n]) ** 2).sum()) for n, p in params.items())
        * 250.0
        / 2
    )
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()
    for name, param in params.items():
        analytic = 250.0 * state.importance[name] * (param.detach() - state.anchor[name])
        assert torch.allclose(param.grad, analytic, rtol=1e-5, atol=1e-6)
    flat = torch.cat(
        [(250.0 * state.importance[n] * (p.detach() - state.anchor[n])).reshape(-1) for n, p in params.items()]
    )
    assert torch.allclose(penalty.gradient(), flat)
    # Zero at the anchor, with a zero gradient there; zero for lambda 0.
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state.anchor[name])
    assert float(penalty()) == 0.0 and float(penalty.gradient().abs().max()) == 0.0
    assert float(EwcPenalty(params, state_for(params, 1), lam=0.0)()) == 0.0


def test_penalty_refuses_a_fisher_of_another_adapter() -> None:
    params = {"a": torch.nn.Parameter(torch.zeros(2, 2))}
    with pytest.raises(TrainingError, match="does not match the adapter's LoRA parameters"):
        EwcPenalty(params, state_for({"b": params["a"]}), 1.0)
    wrong_shape = state_for({"a": torch.nn.Parameter(torch.zeros(3))})
    with pytest.raises(TrainingError, match=r"importance of a has shape \(3,\)"):
        EwcPenalty(params, wrong_shape, 1.0)
    negative = state_for(params)
    negative.importance["a"][0, 0] = -1.0
    with pytest.raises(TrainingError, match="negative or non-finite"):
        EwcPenalty(params, negative, 1.0)


def continue_with(
    tiny_base: Path, tmp_path: Path, name: str, lam: float, max_grad_norm: float | None = None, **extra: Any
) -> tuple[Any, list[Progress]]:
    new = write_samples(tmp_path / "new.jsonl", NEW_ROWS)
    spec = make_spec(tiny_base, new, tmp_path / name, epochs=3, max_grad_norm=max_grad_norm)
    spec.parent_adapter = str(tmp_path / "v1")
    spec.parent_fisher = str(tmp_path / "v1" / FISHER_FILE)
    spec.ewc = spec.ewc.model_copy(update={"lambda_": lam, **extra})
    spec.eval_sets = {"retention": str(tmp_path / "old.jsonl")}
    records: list[Progress] = []
    return train(spec, progress=records.append), records


def distance(a: Path, b: Path) -> float:
    fa, fb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return sum(float(((fa[k] - fb[k]) ** 2).sum()) for k in fa) ** 0.5


def test_recipe_applies_and_logs_the_penalty(tiny_base: Path, tmp_path: Path) -> None:
    old = write_samples(tmp_path / "old.jsonl", ROWS)
    train(make_spec(tiny_base, old, tmp_path / "v1", epochs=4))
    free, free_records = continue_with(tiny_base, tmp_path, "free", 0.0)
    held, held_records = continue_with(tiny_base, tmp_path, "held", 1e6)

    assert all(r.penalty == 0.0 and r.loss == r.task_loss for r in free_records) and free.ewc_penalty == 0.0
    assert held_records[0].penalty == 0.0  # step 1 starts at the anchor (the parent adapter)
    assert all(r.penalty > 0 for r in held_records[1:]) and held.ewc_penalty == held_records[-1].penalty
    assert all(r.loss == pytest.approx(r.task_loss + r.penalty) for r in held_records)
    # The penalty keeps the adapter nearer the parent, and the old samples' loss lower.
    assert distance(tmp_path / "held", tmp_path / "v1") < 0.5 * distance(tmp_path / "free", tmp_path / "v1")
    assert held.eval["retention"]["after"] < free.eval["retention"]["after"]
    assert held.eval["retention"]["before"] == pytest.approx(free.eval["retention"]["before"])
    # With the shipped gradient clipping (norm 1) the penalty's pull is capped (distance to the parent 1.59
    # against 0.95 unclipped and 1.98 free, 5 Dec 2026), but it still holds the adapter nearer than no penalty.
    continue_with(tiny_base, tmp_path, "held-clipped", 1e6, max_grad_norm=1.0)
    assert distance(tmp_path / "held-clipped", tmp_path / "v1") < 0.9 * distance(tmp_path / "free", tmp_path / "v1")

    # The child's file carries both windows: F = gamma * F_parent + F_new (here gamma 0.5).
    _, _ = continue_with(tiny_base, tmp_path, "decayed", 0.0, gamma=0.5)
    parent, child = load_fisher(tmp_path / "v1" / FISHER_FILE), load_fisher(tmp_path / "decayed" / FISHER_FILE)
    assert child.meta["windows"] == "2" and child.meta["gamma"] == "0.5"
    new_part = {n: child.importance[n] - 0.5 * parent.importance[n] for n in parent.importance}
    assert sum(float(t.sum()) for t in new_part.values()) == pytest.approx(1.0, rel=1e-4)  # normalize "sum"
    assert min(float(t.min()) for t in new_part.values()) >= -1e-5


def test_mismatched_parent_fisher_is_a_training_error(tiny_base: Path, tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    spec = make_spec(tiny_base, samples, tmp_path / "out")
    save_fisher(state_for({"not.a.lora.weight": torch.nn.Parameter(torch.zeros(2))}), tmp_path / "f.safetensors")
    spec.parent_fisher = str(tmp_path / "f.safetensors")
    with pytest.raises(TrainingError, match="does not match the adapter's LoRA parameters"):
        train(spec)
    spec.parent_fisher = str(tmp_path / "missing.safetensors")
    code, events, _ = run_command(training_command(write_spec(spec, tmp_path / "spec.json")))
    assert code == 2 and "cannot read the Fisher file" in events[-1]["message"]


def test_spec_file_spells_lambda_as_the_settings_do(tmp_path: Path) -> None:
    base = {"base_model": "b", "samples_path": "s", "output_dir": "o"}
    assert TrainSpec.model_validate(base).ewc.lambda_ == 500.0
    spec = TrainSpec.model_validate({**base, "ewc": {"lambda": 700, "gamma": 0.9}})
    spec.write(tmp_path / "spec.json")
    assert json.loads((tmp_path / "spec.json").read_text())["ewc"]["lambda"] == 700
    assert TrainSpec.read(tmp_path / "spec.json") == spec
    (tmp_path / "old.json").write_text(json.dumps({**base, "ewc_lambda": 300}))  # the former second spelling
    with pytest.raises(TrainingError, match="ewc_lambda: Extra inputs are not permitted"):
        TrainSpec.read(tmp_path / "old.json")
