"""Samples -> token ids for supervised LoRA training (pure functions apart from :func:`read_samples`).

A sample is a prompt and a completion: one to learn (``label`` +1, desirable, the default) or, for the
KTO objective, one to unlearn (``label`` -1, undesirable). ``source`` says where the worker drew it from:
``window`` (the new window), ``replay`` (earlier windows) or ``anchor`` (the anchor set, the user's or the
self-anchor set); training uses every line, the Fisher those of ``ewc.fisher_sources`` (window and anchor).
The prompt is rendered with the tokenizer's chat template when it has one (a string prompt becomes one user
message; ``add_generation_prompt=True``), else with the plain fallback of :func:`render_prompt`. The
completion follows, then the EOS token. Labels are ``-100`` (ignored by the loss) on prompt tokens and
padding, so only the completion is learned. Sequences longer than ``max_length`` lose prompt tokens from the
left first; the completion is cut (from the right) only if it alone does not fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from streamengine.errors import TrainingError

IGNORE_INDEX = -100
SOURCES = ("window", "replay", "anchor")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    event_id: str
    prompt: str | Messages
    completion: str
    weight: float
    label: int = 1
    source: str = "window"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    weight: float
    label: int = 1


class Batch(TypedDict):
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 0 on padding
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX on prompt and padding
    weights: torch.Tensor  # [B] float32
    signs: torch.Tensor  # [B] float32, +1 desirable, -1 undesirable


def _parse_prompt(text: Any, where: str) -> str | Messages:
    if not isinstance(text, str):
        raise TrainingError(f"{where}: prompt must be JSON text, got {type(text).__name__}")
    try:
        prompt = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{where}: prompt is not JSON text: {exc}") from None
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise TrainingError(f"{where}: prompt must be a string or a list of {{role, content}} messages")


def parse_sample(line: str, where: str = "sample") -> Example:
    """One JSONL line -> :class:`Example`; every problem is a :class:`TrainingError` naming ``where``."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{where}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{where}: a sample must be a JSON object")
    where = f"{where} ({raw.get('event_id')})"
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise TrainingError(f"{where}: weight must be a finite number, got {weight!r}")
    if weight < 0:
        raise TrainingError(f"{where}: weight must not be negative, got {weight}")
    completion = raw.get("completion")
    if not isinstance(completion, str):
        raise TrainingError(f"{where}: completion must be a string")
    label = raw.get("label", 1)
    if isinstance(label, bool) or label not in (1, -1):
        raise TrainingError(f"{where}: label must be 1 (desirable) or -1 (undesirable), got {label!r}")
    source = raw.get("source", "window")
    if source not in SOURCES:
        raise TrainingError(f"{where}: source must be one of {', '.join(SOURCES)}, got {source!r}")
    return Example(
        event_id=str(raw.get("event_id", "")),
        prompt=_parse_prompt(raw.get("prompt"), where),
        completion=completion,
        weight=float(weight),
        label=int(label),
        source=str(source),
    )


def read_samples(path: str | Path) -> list[Example]:
    """Read a JSONL samples file (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainingError(f"cannot read samples {path}: {exc}") from None
    return [parse_sample(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> str:
    """The prompt text the model sees before the completion.

    With a chat template: the template applied to the messages (a string is one user message) with
    the generation prompt. Without one (plain fallback): ``"{prompt}\\n"`` for a string, and for
    messages one ``"{role}: {content}"`` line each followed by ``"assistant: "``.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    if isinstance(prompt, str):
        return prompt + "\n"
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """Token ids and labels of one example, at most ``max_length`` tokens.

    Prompt and completion are tokenized separately (special tokens come from the template only),
    so the prompt/completion boundary is exact. At least one prompt token is kept when the prompt
    has any, so the first completion token is still predicted.
    """
    if max_length < 2:
        raise TrainingError(f"max_length must be at least 2, got {max_length}")
    prompt_ids: list[int] = tokenizer(render_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    completion_ids: list[int] = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, int(tokenizer.eos_token_id)]
    keep_prompt = min(len(prompt_ids), max(max_length - len(completion_ids), 1))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
    completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return Encoded(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        weight=example.weight,
        label=example.label,
    )


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(batch: list[Encoded], pad_token_id: int) -> Batch:
    """Right-pad a batch to its longest sequence."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    signs = torch.tensor([float(e.label) for e in batch], dtype=torch.float32)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, weights=weights, signs=signs)
