"""Self anchors: the filters, the user-turn prefix, the prompt file, and a build on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamengine.errors import TrainingError
from streamengine.training import anchor_job, self_anchor
from streamengine.training.recipe import train
from streamengine.training.self_anchor import Filters, keep, read_prompts, repeat_share, user_turn
from streamengine.training.spec import AnchorSpec
from tests.training_tools import make_spec, pretrained_ok_model, write_samples


def test_keep_drops_empties_duplicates_and_degenerate_repeats() -> None:
    pairs = [
        ("copy abc", "abc"),
        ("", "x"),
        ("Copy  ABC", "abc"),  # the same prompt, case and blanks aside
        ("say", ""),
        ("echo", "ha" * 20),
        ("list the planets", "Mercury, Venus, Earth, Mars"),
    ]
    kept, dropped = keep([*pairs, ("a long story", None)], Filters())  # type: ignore[list-item]
    assert kept == [("copy abc", "abc"), ("list the planets", "Mercury, Venus, Earth, Mars")]
    assert dropped == {"unfinished": 1, "empty": 2, "duplicate": 1, "repeat": 1}


def test_repeat_share() -> None:
    assert repeat_share("abcabcabcabcabcabc", 3) == pytest.approx(1.0)
    assert repeat_share("the quick brown fox jumps", 4) < 0.2
    assert repeat_share("short", 4) == 0.0


def test_user_turn_of_a_chat_template_and_none_without(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert user_turn(tokenizer) == ("<|user|>", "\n")
    tokenizer.chat_template = None
    assert user_turn(tokenizer) is None


def test_read_prompts_jsonl_or_plain_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "a question"}\nplain text prompt\n\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
    assert read_prompts(path) == ["a question", "plain text prompt", [{"role": "user", "content": "hi"}]]
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(TrainingError, match="a line must be text"):
        read_prompts(path)


def test_anchor_job_answers_given_prompts_and_writes_what_the_base_says(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "anchors.jsonl"
    settings = {"magpie": False, "samples": 4, "max_new_tokens": 6, "max_repeat": 1.0}
    spec = AnchorSpec(base_model=str(tiny_model), out_path=str(out), prompts_path=str(prompts), self_anchor=settings,
                      device="cpu")  # fmt: skip
    result = anchor_job.run(spec)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.samples == len(rows) <= 4 and result.sources == {"prompts": len(rows)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = self_anchor.answer(model, tokenizer, [r["prompt"] for r in rows], 6)
    assert [r["completion"] for r in rows] == expected  # the base's own greedy answers


def test_magpie_writes_prompts_from_the_user_turn_prefix(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    first = self_anchor.write_prompts(model, tokenizer, 5, 8, 1.0, seed=3)
    assert len(first) == 5 and all(p is None or "\n" not in p for p in first)
    assert self_anchor.write_prompts(model, tokenizer, 5, 8, 1.0, seed=3) == first  # seeded
    tokenizer.chat_template = None
    with pytest.raises(TrainingError, match="no chat template"):
        self_anchor.write_prompts(model, tokenizer, 1, 8, 1.0, seed=0)


def test_a_job_with_self_anchors_keeps_the_base_skill_one_without_loses_it(tmp_path: Path) -> None:
    """Deterministic on CPU: the window ("w x" -> "no") overwrites the base's "ok"; the base's own answers to a
    prompt-only file, mixed in as anchor lines, keep it."""
    base = pretrained_ok_model(tmp_path / "base")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"q p{i}\n" for i in range(12)))
    out = tmp_path / "anchors.jsonl"
    cfg = {"magpie": False, "samples": 12, "max_new_tokens": 4, "max_repeat": 1.0}
    anchor_job.run(AnchorSpec(base_model=str(base), out_path=str(out), prompts_path=str(prompts), self_anchor=cfg,
                              device="cpu"))  # fmt: skip
    anchors = [json.loads(line) for line in out.read_text().splitlines()]
    assert {a["completion"] for a in anchors} == {"ok"}  # what the base says
    window = [(f"w {i}", "no") for i in range(24)]
    held = write_samples(tmp_path / "base-skill.jsonl", [(f"q h{i}", "ok") for i in range(8)])
    losses = {}
    for name, rows in {
        "without": window,
        "with": window + [(a["prompt"], a["completion"], 1.0, 1, "anchor") for a in anchors],
    }.items():
        spec = make_spec(base, write_samples(tmp_path / f"{name}.jsonl", rows), tmp_path / name, epochs=4)
        spec.eval_sets = {"base": str(held)}
        losses[name] = train(spec).eval["base"]
    # Deterministic on one machine; CPUs round differently (float32): before / without / with were 0.028 / 3.93 /
    # 0.020 on the machines of earlier sessions, 0.037 / 4.68 / 0.032 on an AVX-512 one and 0.023 / 4.55 / 0.68 on
    # an AMD AVX2 one (6 Dec 2026), where the anchors held most of the skill but not all of it. The bounds hold
    # for all three: the window overwrites the skill, the anchors keep at least 80% of what it would lose.
    before = losses["without"]["before"]
    assert before == losses["with"]["before"] and before < 0.05
    assert losses["without"]["after"] > 3.0  # the window overwrote the base skill: 100x the loss
    assert losses["with"]["after"] - before < 0.2 * (losses["without"]["after"] - before)  # the anchors kept it
