"""The training package on a real tiny Llama (torch + transformers + peft, CPU, seconds per test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from streamengine.config.settings import LoraSettings  # noqa: E402
from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.data import (  # noqa: E402
    IGNORE_INDEX,
    Example,
    collate,
    encode,
    pad_id,
    parse_sample,
    read_samples,
    render_prompt,
)
from streamengine.training.launch import training_command  # noqa: E402
from streamengine.training.model import load_for_training, missing_target_modules  # noqa: E402
from streamengine.training.recipe import batch_losses, train, weighted_loss  # noqa: E402
from streamengine.training.spec import Progress, TrainResult, TrainSpec  # noqa: E402
from tests.training_tools import TARGETS, make_spec, run_command, sample_line, write_spec  # noqa: E402

SAMPLES: list[tuple[Any, str, float]] = [
    ("What is 2+2?", "4", 1.0),
    ([{"role": "user", "content": "Say hello"}], "Hello there!", 1.0),
    ("Capital of France?", "Paris", 2.0),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Color of sky?"}], "Blue.", 0.5),
    ("Name a fruit", "apple", 1.0),
    ("Opposite of hot", "cold", 1.0),
]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_base: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def plain_tokenizer(tiny_base: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="session")
def samples_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    path.write_text("".join(sample_line(f"e{i}", *s) + "\n" for i, s in enumerate(SAMPLES)))
    return path


# --- data -------------------------------------------------------------------------------------------


def test_chat_template_renders_prompt_and_masks_it(tokenizer: Any) -> None:
    example = Example("e1", [{"role": "user", "content": "hi"}], "Hello!", 1.0)
    enc = encode(tokenizer, example, max_length=128)
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    assert tokenizer.decode(enc.input_ids[:n_prompt]) == "<|user|>hi\n<|assistant|>"
    completion = tokenizer("Hello!", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert enc.labels[n_prompt:] == completion == enc.input_ids[n_prompt:]
    assert all(label == IGNORE_INDEX for label in enc.labels[:n_prompt])
    # A string prompt is one user message.
    assert render_prompt(tokenizer, "hi") == "<|user|>hi\n<|assistant|>"


def test_plain_fallback_without_chat_template(plain_tokenizer: Any) -> None:
    assert render_prompt(plain_tokenizer, "hi") == "hi\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(plain_tokenizer, messages) == "system: Be brief.\nuser: hi\nassistant: "
    enc = encode(plain_tokenizer, Example("e1", "hi", "yo", 1.0), max_length=64)
    assert plain_tokenizer.decode(enc.input_ids) == "hi\nyo</s>"
    assert enc.labels == [IGNORE_INDEX] * 3 + enc.input_ids[3:]


def test_truncation_drops_prompt_from_the_left_and_keeps_completion(plain_tokenizer: Any) -> None:
    enc = encode(plain_tokenizer, Example("e1", "x" * 50 + "END", "answer", 1.0), max_length=16)
    assert len(enc.input_ids) == 16
    assert plain_tokenizer.decode(enc.input_ids) == "xxxxxEND\nanswer</s>"
    assert enc.labels.count(IGNORE_INDEX) == 9
    # A completion longer than max_length keeps one prompt token and loses its own end.
    enc = encode(plain_tokenizer, Example("e2", "question", "a" * 40, 1.0), max_length=16)
    assert plain_tokenizer.decode(enc.input_ids) == "\n" + "a" * 15
    assert enc.labels[0] == IGNORE_INDEX and IGNORE_INDEX not in enc.labels[1:]


def test_collate_pads_and_masks(tokenizer: Any) -> None:
    short = encode(tokenizer, Example("a", "hi", "x", 1.0), 128)
    long = encode(tokenizer, Example("b", "hello there", "longer answer", 0.5), 128)
    batch = collate([short, long], pad_id(tokenizer))
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
    assert batch["weights"].tolist() == [1.0, 0.5]


def test_bad_samples_are_training_errors(tmp_path: Path) -> None:
    good = parse_sample(sample_line("e1", [{"role": "user", "content": "q"}], "a", 2.0))
    assert good == Example("e1", [{"role": "user", "content": "q"}], "a", 2.0)
    with pytest.raises(TrainingError, match=r"e2.*weight must be a finite number"):
        parse_sample('{"event_id": "e2", "prompt": "\\"q\\"", "completion": "a", "weight": NaN}')
    with pytest.raises(TrainingError, match="weight must not be negative"):
        parse_sample(sample_line("e3", "q", "a", -1.0))
    with pytest.raises(TrainingError, match="not JSON text"):
        parse_sample('{"event_id": "e4", "prompt": "plain text", "completion": "a", "weight": 1}')
    with pytest.raises(TrainingError, match=r"list of \{role, content\}"):
        parse_sample(sample_line("e5", [{"role": "user"}], "a", 1.0))
    path = tmp_path / "s.jsonl"
    path.write_text(sample_line("e1", "q", "a", 1.0) + "\n\nnot json\n")
    with pytest.raises(TrainingError, match=r"s\.jsonl:3: not JSON"):
        read_samples(path)


# --- model and loss ---------------------------------------------------------------------------------


def test_missing_target_modules_are_named(tiny_base: Path) -> None:
    lora = LoraSettings(target_modules=["q_proj", "gate_projx", "up"])
    with pytest.raises(TrainingError, match="no module named gate_projx, up") as err:
        load_for_training(str(tiny_base), lora, None, "cpu")
    assert "q_proj," not in str(err.value).split("(")[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert missing_target_modules(model, [*TARGETS, "gate_proj", "mlp.up_proj", "lm_head"]) == []


def test_zero_weight_sample_changes_neither_loss_nor_gradient(tiny_base: Path, tokenizer: Any) -> None:
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    loaded = load_for_training(str(tiny_base), lora, None, "cpu")
    model = loaded.model
    with torch.no_grad():  # a non-zero LoRA B, so that every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    pad = pad_id(tokenizer)
    a = encode(tokenizer, Example("a", "What is 2+2?", "4", 1.0), 128)
    b = encode(tokenizer, Example("b", "Capital?", "Paris", 2.0), 128)
    zero = encode(tokenizer, Example("z", "A much longer prompt than the others", "ignored answer", 0.0), 128)

    def loss_and_grads(chunk: list[Any]) -> tuple[float, list[Any]]:
        model.zero_grad()
        batch = collate(chunk, pad)
        loss = weighted_loss(batch_losses(model, batch, torch.device("cpu")), batch["weights"])
        loss.backward()
        return float(loss.detach()), [
            p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None
        ]

    loss_2, grads_2 = loss_and_grads([a, b])
    loss_3, grads_3 = loss_and_grads([a, zero, b])
    assert loss_3 == pytest.approx(loss_2, abs=1e-6)
    for g2, g3 in zip(grads_2, grads_3, strict=True):
        assert torch.allclose(g2, g3, atol=1e-7)
    # And the weights do weigh: doubling b's weight moves the loss towards b's.
    losses = batch_losses(model, collate([a, b], pad), torch.device("cpu")).detach()
    assert loss_2 == pytest.approx(float((losses[0] + 2 * losses[1]) / 3), abs=1e-6)


# --- the recipe -------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_only_safe_files(
    tiny_base: Path, samples_file: Path, tmp_path: Path
) -> None:
    records: list[Progress] = []
    result = train(make_spec(tiny_base, samples_file, tmp_path / "out"), progress=records.append)
    # Pinned CPU float32 numbers for this model, these samples and seed 0.
    assert result.eval_loss_before == pytest.approx(5.9580, abs=1e-3)
    assert result.eval_loss_after == pytest.approx(5.5843, abs=1e-2)
    assert result.eval_loss_after < result.eval_loss_before - 0.3
    assert result.train_loss < result.eval_loss_before
    assert (result.steps, result.samples, result.tokens) == (6, 6, 807)
    assert [r.step for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r.total_steps for r in records} == {6} and records[-1].eta_s == 0.0
    assert [r.epoch for r in records] == [1, 1, 2, 2, 3, 3]
    assert all(r.tokens_per_s > 0 for r in records)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "fisher.safetensors",
        "result.json",
    ]
    assert TrainResult.model_validate_json((out / "result.json").read_text()) == result
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, sorted(TARGETS))
    # Deterministic: the same spec gives the same numbers.
    again = train(make_spec(tiny_base, samples_file, tmp_path / "again"))
    assert again.eval_loss_after == result.eval_loss_after


def test_child_continues_from_the_parent_adapter(tiny_base: Path, samples_file: Path, tmp_path: Path) -> None:
    parent = train(make_spec(tiny_base, samples_file, tmp_path / "v1", epochs=2))
    child_spec = make_spec(tiny_base, samples_file, tmp_path / "v2", epochs=2)
    child_spec.parent_adapter = str(tmp_path / "v1")
    child_spec.lora.r = 4  # ignored: the parent's LoRA configuration wins
    child = train(child_spec)
    assert child.eval_loss_before == pytest.approx(parent.eval_loss_after, abs=1e-5)
    assert child.eval_loss_after < child.eval_loss_before
    assert json.loads((tmp_path / "v2" / "adapter_config.json").read_text())["r"] == 8


def test_divergence_raises_training_error_naming_the_step(tiny_base: Path, samples_file: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"loss became nan at step 2/6 \(epoch 1\)"):
        train(make_spec(tiny_base, samples_file, tmp_path / "out", learning_rate=1e20))
    assert not (tmp_path / "out" / "result.json").exists()
    # The penalty seam (EWC) is part of the checked objective.
    with pytest.raises(TrainingError, match="loss became inf at step 1/"):
        train(make_spec(tiny_base, samples_file, tmp_path / "p"), penalty=lambda m: torch.tensor(float("inf")))


def test_no_positive_weight_is_a_training_error(tiny_base: Path, tmp_path: Path) -> None:
    samples = tmp_path / "s.jsonl"
    samples.write_text(sample_line("e1", "q", "a", 0.0) + "\n")
    with pytest.raises(TrainingError, match="no desirable sample with a positive weight"):
        train(make_spec(tiny_base, samples, tmp_path / "out"))


# --- the process the worker runs --------------------------------------------------------------------


def run_recipe(spec: TrainSpec, tmp_path: Path) -> tuple[int, list[dict[str, Any]], str]:
    return run_command(training_command(write_spec(spec, tmp_path / "spec.json")), timeout=120)


def test_entry_point_writes_a_loadable_adapter(tiny_base: Path, samples_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, events, stderr = run_recipe(make_spec(tiny_base, samples_file, out), tmp_path)
    assert code == 0, stderr
    phases = ["loading_base", "evaluating", "training", *["progress"] * 6, "evaluating", "fisher", "result"]
    assert [e.get("phase", e["event"]) for e in events] == phases
    assert events[-1]["steps"] == 6 and events[-1]["eval_loss_after"] < events[-1]["eval_loss_before"]

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = torch.tensor([tok("<|user|>Capital of France?\n<|assistant|>Paris")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned_logits = PeftModel.from_pretrained(base, out).eval()(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


def test_entry_point_reports_training_errors(tiny_base: Path, samples_file: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_base, samples_file, tmp_path / "out")
    spec.lora.target_modules = ["q_proj", "nope_proj"]
    code, events, _ = run_recipe(spec, tmp_path)
    assert code == 2
    assert events[-1]["event"] == "error" and "no module named nope_proj" in events[-1]["message"]
