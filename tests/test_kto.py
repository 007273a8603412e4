"""The KTO objective (TRL's KTOTrainer loss): formula, KL pairs, and that it moves likelihoods the right way."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.data import Example, encode, pad_id  # noqa: E402
from streamengine.training.kto import kl_partners, kto_losses, mismatched_examples, sequence_logps  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from tests.training_tools import make_spec, write_samples  # noqa: E402

PAIRS = [
    ("Is the sky blue?", "Yes, it is blue.", "Purple bananas."),
    ("What is 2+2?", "It is four.", "It is seven."),
    ("Say hello", "Hello there!", "Go away!"),
    ("Capital of France?", "Paris.", "Berlin."),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_losses_follow_trl() -> None:
    policy = torch.tensor([-3.0, -5.0, -2.0, -4.0])
    reference = torch.tensor([-4.0, -4.5, -2.0, -6.0])
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0])
    losses = kto_losses(policy, reference, 0.3, signs, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    ratios = [1.0, -0.5, 0.0, 2.0]
    expected = [
        1.5 * (1 - sigmoid(0.1 * (ratios[0] - 0.3))),
        1.5 * (1 - sigmoid(0.1 * (ratios[1] - 0.3))),
        0.5 * (1 - sigmoid(0.1 * (0.3 - ratios[2]))),
        0.5 * (1 - sigmoid(0.1 * (0.3 - ratios[3]))),
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # Raising a desirable completion's likelihood lowers its loss; raising an undesirable one's raises it.
    p = policy.clone().requires_grad_(True)
    kto_losses(p, reference, 0.3, signs).sum().backward()
    assert p.grad is not None and (p.grad[:2] < 0).all() and (p.grad[2:] > 0).all()


def test_kl_pairs_are_mismatched_and_seeded() -> None:
    for n in (2, 3, 7, 16):
        partners = kl_partners(n, seed=1)
        assert sorted(partners) == list(range(n)) and all(partners[i] != i for i in range(n))
        assert kl_partners(n, seed=1) == partners
    examples = [Example(str(i), f"prompt {i}", f"completion {i}", 1.0, label=-1 if i % 2 else 1) for i in range(5)]
    pairs = mismatched_examples(examples, seed=0)
    partners = kl_partners(5, seed=0)
    assert [p.completion for p in pairs] == [f"completion {j}" for j in partners]
    assert [p.prompt for p in pairs] == [e.prompt for e in examples]


def logps(base: Path, adapter: Path | None, examples: list[Example]) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    encoded = [encode(tok, e, 128) for e in examples]
    return sequence_logps(model, encoded, 8, pad_id(tok), torch.device("cpu"))


def test_kto_raises_desirable_and_lowers_undesirable_likelihood(tiny_base: Path, tmp_path: Path) -> None:
    rows: list[tuple[Any, ...]] = []
    for prompt, good, bad in PAIRS:
        rows += [(prompt, good, 1.0, 1), (prompt, bad, 1.0, -1)]
    samples = write_samples(tmp_path / "kto.jsonl", rows)
    spec = make_spec(tiny_base, samples, tmp_path / "kto", epochs=10, objective="kto", learning_rate=2e-2)
    result = train(spec)
    assert result.objective == "kto" and result.samples == 8
    good = [Example("g", p, g, 1.0) for p, g, _ in PAIRS]
    bad = [Example("b", p, b, 1.0) for p, _, b in PAIRS]
    good_delta = logps(tiny_base, tmp_path / "kto", good) - logps(tiny_base, None, good)
    bad_delta = logps(tiny_base, tmp_path / "kto", bad) - logps(tiny_base, None, bad)
    assert (good_delta > 0).all(), good_delta
    assert (bad_delta < 0).all(), bad_delta
    assert result.train_loss < 0.5  # every KTO loss starts at 1 - sigmoid(0) = 0.5

    # SFT on the same file learns only the desirable lines.
    sft = train(make_spec(tiny_base, samples, tmp_path / "sft", epochs=2))
    assert sft.samples == 4 and sft.objective == "sft"
    only_bad = write_samples(tmp_path / "bad.jsonl", [(p, b, 1.0, -1) for p, _, b in PAIRS])
    with pytest.raises(TrainingError, match="no desirable sample"):
        train(make_spec(tiny_base, only_bad, tmp_path / "none"))


def test_kto_keeps_the_ewc_penalty(tiny_base: Path, tmp_path: Path) -> None:
    rows: list[tuple[Any, ...]] = []
    for prompt, good, bad in PAIRS:
        rows += [(prompt, good, 1.0, 1), (prompt, bad, 1.0, -1)]
    samples = write_samples(tmp_path / "kto.jsonl", rows)
    train(make_spec(tiny_base, samples, tmp_path / "v1", epochs=2))  # an SFT parent with its Fisher
    spec = make_spec(tiny_base, samples, tmp_path / "v2", epochs=2, objective="kto")
    spec.parent_adapter, spec.parent_fisher = str(tmp_path / "v1"), str(tmp_path / "v1" / "fisher.safetensors")
    spec.ewc = spec.ewc.model_copy(update={"lambda_": 1e6})
    records: list[Any] = []
    result = train(spec, progress=records.append)
    assert records[0].penalty == 0.0 and all(r.penalty > 0 for r in records[1:])
    assert result.ewc_penalty == records[-1].penalty > 0 and result.objective == "kto"
