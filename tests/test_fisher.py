"""The exact per-sample Fisher (vmap against the per-sample loop), its weighting, masking and file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from streamengine.config.settings import EwcSettings, LoraSettings  # noqa: E402
from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.data import Example, collate, encode, pad_id  # noqa: E402
from streamengine.training.fisher import (  # noqa: E402
    FISHER_FILE,
    FisherState,
    accumulate,
    compute_fisher_file,
    fisher_sums_loop,
    fisher_sums_vmap,
    load_fisher,
    lora_parameters,
    normalise,
    save_fisher,
)
from streamengine.training.losses import batch_losses  # noqa: E402
from streamengine.training.model import load_for_training  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from tests.training_tools import make_spec, write_samples  # noqa: E402

CPU = torch.device("cpu")
EXAMPLES = [
    Example("a", "What is 2+2?", "4", 1.0),
    Example("b", [{"role": "user", "content": "Say hello"}], "Hello there, friend!", 2.0),
    Example("c", "Capital of France?", "Paris", 0.5),
    Example("d", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}], "Blue.", 1.0),
    Example("e", "A much longer prompt, so that this chunk is padded", "ok", 3.0),
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def loaded(tiny_base: Path) -> Any:
    loaded = load_for_training(str(tiny_base), LoraSettings(r=4, alpha=8, dropout=0.0), None, "cpu")
    with torch.no_grad():  # a non-zero B, so that every LoRA weight has a gradient
        torch.manual_seed(0)
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return loaded


def relative_error(a: dict[str, Any], b: dict[str, Any]) -> float:
    num = sum(float(((a[n] - b[n]) ** 2).sum()) for n in b)
    return (num / sum(float((b[n] ** 2).sum()) for n in b)) ** 0.5


def test_vmap_fisher_matches_the_per_sample_loop(loaded: Any) -> None:
    encoded = [encode(loaded.tokenizer, e, 128) for e in EXAMPLES]
    pad = pad_id(loaded.tokenizer)
    loop = fisher_sums_loop(loaded.model, encoded, pad, CPU)
    for chunk in (1, 2, 8):  # 2: chunks of unequal lengths, padded on the right
        fast = fisher_sums_vmap(loaded.model, encoded, pad, CPU, chunk_size=chunk)
        assert relative_error(fast.mean(), loop.mean()) < 1e-5
        assert (fast.samples, fast.weight) == (5, 7.5)
    assert set(loop.sums) == set(lora_parameters(loaded.model))
    assert all(".default." not in n for n in loop.sums)
    assert all(float(s.sum()) > 0 for s in loop.sums.values())
    assert loaded.model.training  # the mode the model came in with


def test_fisher_is_the_weighted_mean_of_squared_per_sample_gradients(loaded: Any) -> None:
    model, tok = loaded.model, loaded.tokenizer
    pad = pad_id(tok)
    a, b = (encode(tok, e, 128) for e in EXAMPLES[:2])
    fisher = fisher_sums_vmap(model, [a, b], pad, CPU).mean()
    params = lora_parameters(model)
    model.eval()
    grads = []
    for example in (a, b):  # the training loss of one sample: masked prompt, mean over completion tokens
        loss = batch_losses(model, collate([example], pad), CPU)[0]
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
    model.train()
    expected = {n: (a.weight * grads[0][n] ** 2 + b.weight * grads[1][n] ** 2) / (a.weight + b.weight) for n in params}
    assert relative_error(fisher, expected) < 1e-5
    # A sample counted twice is the same as its weight doubled; a zero-weight sample changes nothing.
    doubled = fisher_sums_vmap(model, [a, a, b], pad, CPU).mean()
    weighted = fisher_sums_vmap(model, [replace(a, weight=2 * a.weight), b], pad, CPU).mean()
    assert relative_error(doubled, weighted) < 1e-6
    zero = fisher_sums_vmap(model, [a, b, replace(encode(tok, EXAMPLES[4], 128), weight=0.0)], pad, CPU).mean()
    assert relative_error(zero, fisher) < 1e-6


def test_prompt_tokens_do_not_count_but_condition(loaded: Any) -> None:
    tok, pad = loaded.tokenizer, pad_id(loaded.tokenizer)
    base = encode(tok, Example("x", "Question one?", "Answer", 1.0), 128)
    other_prompt = encode(tok, Example("y", "A different question", "Answer", 1.0), 128)
    f1 = fisher_sums_vmap(loaded.model, [base], pad, CPU).mean()
    f2 = fisher_sums_vmap(loaded.model, [other_prompt], pad, CPU).mean()
    assert relative_error(f1, f2) > 1e-3  # the prompt conditions the completion...
    # ...but only completion tokens are scored: labels on the prompt would change the Fisher.
    unmasked = type(base)(base.input_ids, list(base.input_ids), 1.0)
    f3 = fisher_sums_vmap(loaded.model, [unmasked], pad, CPU).mean()
    assert relative_error(f3, f1) > 1e-3


def test_normalise_and_online_accumulation(tmp_path: Path) -> None:
    new = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[2.0, 2.0]])}
    scaled, raw_mean = normalise(new, "mean")
    assert raw_mean == 2.0 and torch.equal(scaled["a"], torch.tensor([0.5, 1.5]))
    assert normalise(new, "none")[0] is new
    summed, _ = normalise(new, "sum")
    assert torch.equal(summed["a"], torch.tensor([0.125, 0.375])) and torch.equal(
        summed["b"], torch.tensor([[0.25, 0.25]])
    )
    assert normalise({"a": torch.zeros(3)}, "mean")[0]["a"].sum() == 0  # nothing learned: stays zero
    with pytest.raises(TrainingError, match="unknown Fisher normalisation"):
        normalise(new, "max")

    anchor1 = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([[0.3, 0.4]])}
    first = accumulate(new, anchor1, None, gamma=0.5, normalize="mean", samples=10, weight=12.0)
    assert first.meta["windows"] == "1" and first.meta["samples"] == "10" and first.normalize == "mean"
    path = save_fisher(first, tmp_path / FISHER_FILE)
    loaded = load_fisher(path)
    assert torch.equal(loaded.importance["a"], scaled["a"]) and torch.equal(loaded.anchor["b"], anchor1["b"])
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["anchor.a", "anchor.b", "fisher.a", "fisher.b"]

    newer = {"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # mean 2
    anchor2 = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[1.0, 1.0]])}
    second = accumulate(newer, anchor2, loaded, gamma=0.5, normalize="mean", samples=5)
    assert torch.allclose(second.importance["a"], 0.5 * scaled["a"] + torch.tensor([2.0, 0.0]))
    assert torch.allclose(second.importance["b"], 0.5 * scaled["b"] + torch.tensor([[0.0, 2.0]]))
    assert torch.equal(second.anchor["a"], anchor2["a"])  # the anchor is the newest version's
    assert (second.meta["windows"], second.meta["samples"]) == ("2", "15")

    with pytest.raises(TrainingError, match="normalised with 'mean'"):
        accumulate(newer, anchor2, loaded, gamma=1.0, normalize="none")
    with pytest.raises(TrainingError, match="does not match the adapter's LoRA parameters"):
        accumulate({"a": newer["a"]}, {"a": anchor2["a"]}, loaded, gamma=1.0, normalize="mean")
    bad = tmp_path / "bad.safetensors"
    save_fisher(FisherState({"a": torch.ones(1)}, {"a": torch.ones(1)}, {"format": "other"}), bad)
    with pytest.raises(TrainingError, match="not a streamengine Fisher file"):
        load_fisher(bad)
    with pytest.raises(TrainingError, match="cannot read the Fisher file"):
        load_fisher(tmp_path / "missing.safetensors")


def test_recipe_writes_the_window_and_anchor_fisher_and_compute_fisher_file_agrees(
    tiny_base: Path, tmp_path: Path
) -> None:
    rows = [
        ("What is 2+2?", "4", 1.0, 1, "window"),
        ("Capital of France?", "Paris", 2.0, 1, "window"),
        ("Name a fruit", "apple", 1.0, 1, "replay"),  # trained on, not in the Fisher by default
        ("Opposite of hot", "cold", 1.0, 1, "anchor"),
        ("Say something rude", "no", 1.0, -1, "window"),  # undesirable: not trained by SFT, no Fisher
    ]
    samples = write_samples(tmp_path / "s.jsonl", rows)
    result = train(make_spec(tiny_base, samples, tmp_path / "v1", epochs=2))
    assert result.samples == 4 and result.fisher_seconds > 0
    fisher = load_fisher(tmp_path / "v1" / FISHER_FILE)
    assert fisher.meta["samples"] == "3" and float(fisher.meta["weight"]) == 4.0  # window and anchor: the default
    assert (fisher.meta["normalize"], fisher.meta["gamma"], fisher.meta["windows"]) == ("sum", "1.0", "1")  # defaults
    assert sum(float(t.sum()) for t in fisher.importance.values()) == pytest.approx(1.0, rel=1e-5)

    sources = ("window", "anchor")
    again = compute_fisher_file(
        str(tiny_base), tmp_path / "v1", samples, tmp_path / "again.safetensors", sources=sources, device="cpu"
    )
    recomputed = load_fisher(again)
    assert relative_error(recomputed.importance, fisher.importance) < 1e-5
    assert all(torch.equal(recomputed.anchor[n], fisher.anchor[n]) for n in fisher.anchor)

    chained = compute_fisher_file(
        str(tiny_base), tmp_path / "v1", samples, tmp_path / "chained.safetensors", again, gamma=0.25,
        sources=sources, device="cpu",
    )  # fmt: skip
    expected = {n: 1.25 * t for n, t in fisher.importance.items()}
    assert relative_error(load_fisher(chained).importance, expected) < 1e-5
    assert load_fisher(chained).meta["windows"] == "2"
    defaulted = compute_fisher_file(  # gamma from the settings (ewc.gamma 1.0)
        str(tiny_base), tmp_path / "v1", samples, tmp_path / "defaulted.safetensors", again, sources=sources,
        device="cpu",
    )  # fmt: skip
    expected = {n: 2.0 * t for n, t in fisher.importance.items()}
    assert relative_error(load_fisher(defaulted).importance, expected) < 1e-5
    only_replay = write_samples(tmp_path / "r.jsonl", [("q", "a", 1.0, 1, "replay")])
    with pytest.raises(TrainingError, match="no desirable window/anchor sample"):
        compute_fisher_file(str(tiny_base), tmp_path / "v1", only_replay, tmp_path / "x.safetensors",
                            sources=sources, device="cpu")  # fmt: skip


def test_fisher_sources_add_the_anchor_lines_to_the_fisher(tiny_base: Path, tmp_path: Path) -> None:
    rows = [
        ("What is 2+2?", "4", 1.0, 1, "window"),
        ("Name a fruit", "apple", 1.0, 1, "replay"),
        ("Opposite of hot", "cold", 2.0, 1, "anchor"),
        ("Opposite of up", "down", 0.0, 1, "anchor"),  # no weight: not counted
    ]
    samples = write_samples(tmp_path / "s.jsonl", rows)
    with_anchors = make_spec(tiny_base, samples, tmp_path / "wa", epochs=2)  # the default: window and anchor
    window_only = with_anchors.model_copy(
        update={"output_dir": str(tmp_path / "w"), "ewc": EwcSettings(fisher_sources=["window"])}
    )
    train(window_only)
    train(with_anchors)
    window, both = load_fisher(tmp_path / "w" / FISHER_FILE), load_fisher(tmp_path / "wa" / FISHER_FILE)
    assert (window.meta["samples"], window.meta["weight"]) == ("1", "1.0")
    assert (both.meta["samples"], float(both.meta["weight"])) == ("2", 3.0)
    assert relative_error(both.importance, window.importance) > 0.05  # the anchor line moved the importances
    again = compute_fisher_file(
        str(tiny_base), tmp_path / "wa", samples, tmp_path / "again.safetensors", sources=("window", "anchor"),
        device="cpu",
    )  # fmt: skip
    assert relative_error(load_fisher(again).importance, both.importance) < 1e-5
    with pytest.raises(TrainingError, match="no desirable window sample"):
        compute_fisher_file(str(tiny_base), tmp_path / "w", write_samples(tmp_path / "a.jsonl", rows[2:]),
                            tmp_path / "x.safetensors", sources=("window",), device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="fisher_sources"):
        EwcSettings(fisher_sources=["window", "everything"])
    with pytest.raises(ValueError, match="fisher_sources"):
        EwcSettings(fisher_sources=[])


def test_fisher_balance_gives_each_source_an_equal_share(tiny_base: Path, tmp_path: Path) -> None:
    rows = [
        ("What is 2+2?", "4", 1.0, 1, "window"),
        ("Capital of France?", "Paris", 2.0, 1, "window"),
        ("Opposite of hot", "cold", 1.0, 1, "anchor"),
    ]
    samples = write_samples(tmp_path / "s.jsonl", rows)
    ewc = EwcSettings(fisher_balance="sources")
    train(make_spec(tiny_base, samples, tmp_path / "v1", epochs=2).model_copy(update={"ewc": ewc}))

    def raw(sources: tuple[str, ...], balance: str = "pooled") -> dict[str, Any]:
        out = tmp_path / f"{'-'.join(sources)}-{balance}.safetensors"
        compute_fisher_file(str(tiny_base), tmp_path / "v1", samples, out, normalize="none", sources=sources,
                            balance=balance, device="cpu")  # fmt: skip
        return load_fisher(out).importance

    def total(fisher: dict[str, Any]) -> float:
        return sum(float(t.sum()) for t in fisher.values())

    window, anchor, both = raw(("window",)), raw(("anchor",)), raw(("window", "anchor"))
    anchor_share = total(anchor) / (3.0 * total(window) + total(anchor))  # pooled: lines of weight 3 and 1
    assert abs(anchor_share - 0.5) > 0.1, anchor_share  # the anchor line's share is not half
    balanced = raw(("window", "anchor"), "sources")
    expected = {n: total(both) / 2 * (window[n] / total(window) + anchor[n] / total(anchor)) for n in both}
    assert relative_error(balanced, expected) < 1e-5
    assert relative_error(raw(("window",), "sources"), window) < 1e-6  # one source: nothing to balance
    written = load_fisher(tmp_path / "v1" / FISHER_FILE)  # the recipe's, normalised with `sum`
    assert relative_error(written.importance, {n: t / total(expected) for n, t in expected.items()}) < 1e-5
    assert (written.meta["samples"], float(written.meta["weight"])) == ("3", 4.0)
    with pytest.raises(ValueError, match="fisher_balance"):
        EwcSettings(fisher_balance="equal")
    with pytest.raises(TrainingError, match="unknown Fisher balance 'equal'"):
        raw(("window",), "equal")
