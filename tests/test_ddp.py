"""Several training processes (DDP through torchrun + accelerate, gloo on CPU) give the one-process result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.fisher import FISHER_FILE, load_fisher  # noqa: E402
from streamengine.training.launch import FISHER_MODULE, RECIPE_MODULE, fisher_command, training_command  # noqa: E402
from tests.training_tools import make_spec, run_command, write_samples, write_spec  # noqa: E402

# Nine desirable samples, batch 4: SFT's last batch of each epoch has one sample, so one process runs a
# zero-weight stand-in; KTO also trains on the undesirable one (batches 4, 4, 2).
ROWS: list[tuple[Any, ...]] = [
    ("What is 2+2?", "4", 1.0),
    ("Capital of France?", "Paris", 2.0),
    ("Name a fruit", "apple", 0.5),
    ("Opposite of hot", "cold", 1.0),
    ("Say hello", "Hello there!", 1.0),
    ("Colour of grass?", "green", 3.0),
    ("Largest planet?", "Jupiter", 1.0),
    ("Rude reply", "no", 1.0, -1),
    ("Count to three", "one two three", 1.5),
    ("Day after Monday?", "Tuesday", 1.0),
]


def test_training_command_lines() -> None:
    assert training_command("s.json") == [sys.executable, "-m", RECIPE_MODULE, "s.json"]
    assert training_command("s.json", 2, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", RECIPE_MODULE, "s.json",
    ]  # fmt: skip
    assert fisher_command("f.json", python="py") == ["py", "-m", FISHER_MODULE, "f.json"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "kto"])
def test_two_processes_train_like_one(tmp_path: Path, objective: str) -> None:
    base = build_tiny_model(tmp_path / "tiny")
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        spec = make_spec(base, samples, out, epochs=3, objective=objective)
        spec.eval_sets = {"holdout": str(samples)}
        code, events, stderr = run_command(
            training_command(write_spec(spec, tmp_path / f"{processes}.json"), processes)
        )
        assert code == 0, stderr[-3000:]
        kinds = [e.get("phase", e["event"]) for e in events]  # rank 0 alone speaks
        assert kinds == ["loading_base", "evaluating", "training", *["progress"] * 9, "evaluating", "fisher", "result"]
        results[processes] = events[-1]
    one, two = results[1], results[2]
    assert two["processes"] == 2 and one["processes"] == 1
    assert (two["steps"], two["samples"], two["tokens"]) == (one["steps"], one["samples"], one["tokens"])
    assert two["eval_loss_after"] < two["eval_loss_before"] - 0.05
    # The same gradients (up to float summation order): the same losses.
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], abs=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)
    assert two["eval"]["holdout"]["after"] == pytest.approx(one["eval"]["holdout"]["after"], abs=1e-4)
    # The adapter loads, and the sharded Fisher equals the one-process Fisher.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "p2")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    f1, f2 = load_fisher(tmp_path / "p1" / FISHER_FILE), load_fisher(tmp_path / "p2" / FISHER_FILE)
    assert f1.meta["samples"] == f2.meta["samples"] == "9"
    for name, value in f1.importance.items():
        assert torch.allclose(f2.importance[name], value, rtol=1e-3, atol=1e-6)
