"""Quantized bases (bitsandbytes): trained when their gradients are right, refused when they are not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from streamengine.config.settings import LoraSettings  # noqa: E402
from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.fisher import FISHER_FILE, load_fisher, supports_vmap  # noqa: E402
from streamengine.training.model import load_for_training  # noqa: E402
from streamengine.training.quant import check_quantized_gradients, layer_errors, quantized_layers  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from tests.training_tools import make_spec, write_samples  # noqa: E402

CPU = torch.device("cpu")
ROWS: list[tuple[Any, ...]] = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Say hi", "hi there")]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_layers_match_their_dequantized_copy_on_cpu(tiny_base: Path, quantization: str) -> None:
    loaded = load_for_training(str(tiny_base), LoraSettings(r=4, alpha=8, dropout=0.0), None, "cpu", quantization)
    layers = quantized_layers(loaded.model)
    assert len(layers) == 2 * 7  # q/k/v/o and the MLP's three projections, in both layers
    assert not supports_vmap(loaded.model)  # the Fisher falls back to the exact per-sample loop
    errors = layer_errors(layers[0][1], torch.float32, CPU)
    assert errors["train_output"] < 1e-3 and errors["input_grad"] < 1e-3
    assert check_quantized_gradients(loaded.model, quantization, CPU, torch.float32) < 1e-2


def test_training_on_a_4bit_base_runs_when_the_check_passes(tiny_base: Path, tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    spec = make_spec(tiny_base, samples, tmp_path / "q4", epochs=3)
    spec.quantization = "4bit"
    result = train(spec)
    assert result.eval_loss_after < result.eval_loss_before
    assert load_fisher(tmp_path / "q4" / FISHER_FILE).meta["samples"] == "3"


def test_wrong_quantized_gradients_are_refused(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel whose backward loses the input gradient (what a missing autograd kernel does) is caught."""
    original = bnb.nn.Linear4bit.forward

    def cut_graph(self: Any, x: Any) -> Any:
        # The output is exact (the same kernel on the same input); only its graph back to x is gone.
        # (Detaching x instead makes bitsandbytes take its inference kernel, whose output may differ.)
        return original(self, x).detach()

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", cut_graph)
    samples = write_samples(tmp_path / "s.jsonl", ROWS)
    spec = make_spec(tiny_base, samples, tmp_path / "bad")
    spec.quantization = "4bit"
    with pytest.raises(
        TrainingError, match=r"4bit base on cpu: the input grad of quantized layer .* is off by 1"
    ) as err:
        train(spec)
    assert "train with quantization none" in str(err.value)
    assert not (tmp_path / "bad").exists()  # refused before any step, nothing written

    # A forward that is off (a wrong dequantization) is refused the same way.
    def noisy(self: Any, x: Any) -> Any:
        return original(self, x) * 1.5

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", noisy)
    loaded = load_for_training(str(tiny_base), LoraSettings(r=4, alpha=8), None, "cpu", "4bit")
    with pytest.raises(TrainingError, match="eval output of quantized layer"):
        check_quantized_gradients(loaded.model, "4bit", CPU, torch.float32)


def test_an_unquantized_model_cannot_pass_as_quantized(tiny_base: Path) -> None:
    loaded = load_for_training(str(tiny_base), LoraSettings(r=4, alpha=8), None, "cpu")
    with pytest.raises(TrainingError, match="has no quantized layer"):
        check_quantized_gradients(loaded.model, "8bit", CPU, torch.float32)
