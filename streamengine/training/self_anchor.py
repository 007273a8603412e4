"""Anchor samples without a curated anchor set: prompts answered by the base model itself.

An anchor set keeps what the base could do before the first window (docs/learning.md). Users rarely
write one, but prompts are easy to come by, and the base model can answer them: the answers are what
the model should keep saying. Prompts come from up to three places, in this order:

- a prompt-only file the user gives (JSONL, ``{"prompt": str or messages}`` per line, or plain text,
  one prompt a line);
- the stream itself (prompts of every kind of feedback, gathered by the worker);
- the base writing them (Magpie, Xu et al. 2024): given only its chat template's prefix of a user turn,
  a chat model writes a plausible user query. Needs a chat template.

Every prompt is answered greedily by the base (no adapter), then filtered: prompts or answers the model did
not finish within ``max_new_tokens`` (a cut answer, followed by EOS in training, would teach it to stop
short), empty prompts or answers, duplicate prompts, and degenerate repeats (text whose most frequent
n-gram covers more than ``max_repeat`` of it) are dropped. Magpie needs a chat model that writes user
turns; a base trained on completions only writes noise. Deterministic for a given seed on a given device.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from streamengine.errors import TrainingError
from streamengine.training.data import Messages, render_prompt

SENTINEL = "\u2063streamengine-user-turn\u2063"
Prompt = str | Messages


@dataclass(frozen=True)
class Filters:
    """What :func:`keep` drops (``learning.self_anchor.*``)."""

    min_chars: int = 1
    max_repeat: float = 0.5
    ngram: int = 4


def user_turn(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """The chat template's text before and after a user message's content; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False))
    if SENTINEL not in text:
        return None
    prefix, suffix = text.split(SENTINEL, 1)
    return prefix, suffix.strip() or suffix


class _StopAt(StoppingCriteria):
    """Stops each row once its new text holds ``marker`` (decoding only the last few tokens of each row)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, start: int, marker: str) -> None:
        self.tokenizer, self.start, self.marker = tokenizer, start, marker
        self.tail = len(tokenizer(marker, add_special_tokens=False)["input_ids"]) + 2
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.tail) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        hit = torch.tensor([self.marker in t for t in texts], device=input_ids.device)
        self.done = hit if self.done is None else self.done | hit
        return self.done


@torch.no_grad()
def _generate(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int,
    temperature: float, marker: str | None,
) -> list[str | None]:  # fmt: skip
    """Continue each of ``texts`` (left-padded batch) until ``marker`` (or, without one, the EOS): the new text of
    each, special tokens dropped; None for a row that did not finish within ``max_new_tokens``."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    stop = StoppingCriteriaList([_StopAt(tokenizer, ids.shape[1], marker)]) if marker else None
    sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, stopping_criteria=stop,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )  # fmt: skip
    new = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=False)
    special = [t for t in tokenizer.all_special_tokens if t]
    ends = [marker] if marker else special
    return [
        _strip_special(text.split(marker)[0] if marker else text, special) if any(e in text for e in ends) else None
        for text in new
    ]


def _strip_special(text: str, special: Sequence[str]) -> str:
    """The text up to the first special token (EOS, padding), which ends a generation."""
    cut = min((text.index(s) for s in special if s in text), default=len(text))
    return text[:cut]


def write_prompts(
    model: Any, tokenizer: PreTrainedTokenizerBase, count: int, max_new_tokens: int, temperature: float,
    seed: int, batch_size: int = 32,
) -> list[str | None]:  # fmt: skip
    """``count`` user queries the model writes from its template's user-turn prefix (Magpie); None for one it
    did not finish within ``max_new_tokens``."""
    turn = user_turn(tokenizer)
    if turn is None:
        raise TrainingError("the base model has no chat template: it cannot write prompts (use prompts or stream)")
    prefix, suffix = turn
    torch.manual_seed(seed)
    out: list[str | None] = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        out += _generate(model, tokenizer, [prefix] * n, max_new_tokens, temperature, suffix)
    return [None if p is None else p.strip() for p in out]


def answer(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 32
) -> list[str | None]:
    """The model's greedy answer to each prompt, rendered as in training (:func:`render_prompt`); None for one
    it did not finish (no EOS within ``max_new_tokens``: a cut answer would teach the model to stop short)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    out: list[str | None] = []
    for start in range(0, len(texts), batch_size):
        out += _generate(model, tokenizer, texts[start : start + batch_size], max_new_tokens, 0.0, None)
    return out


def repeat_share(text: str, n: int) -> float:
    """The share of ``text``'s character n-grams taken by its most frequent one (0 for short text)."""
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    if len(grams) < 2 * n:
        return 0.0
    return Counter(grams).most_common(1)[0][1] * n / len(text)


def _flat(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def keep(pairs: list[tuple[Prompt, str | None]], filters: Filters) -> tuple[list[tuple[Prompt, str]], dict[str, int]]:
    """``pairs`` without unfinished answers (None), empties, duplicate prompts and degenerate repeats; and how
    many each rule dropped."""
    dropped = {"unfinished": 0, "empty": 0, "duplicate": 0, "repeat": 0}
    seen: set[str] = set()
    out = []
    for prompt, completion in pairs:
        flat = _flat(prompt).strip()
        key = " ".join(flat.lower().split())
        if completion is None:
            dropped["unfinished"] += 1
        elif len(flat) < filters.min_chars or len(completion.strip()) < filters.min_chars:
            dropped["empty"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        elif max(repeat_share(flat, filters.ngram), repeat_share(completion, filters.ngram)) > filters.max_repeat:
            dropped["repeat"] += 1
        else:
            seen.add(key)
            out.append((prompt, completion))
    return out, dropped


def read_prompts(path: str | Path) -> list[Prompt]:
    """A prompt-only file: JSONL of ``{"prompt": str or messages}`` objects, or plain text, one prompt a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainingError(f"cannot read prompts {path}: {exc}") from None
    prompts: list[Prompt] = []
    for line in filter(str.strip, lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = line
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if isinstance(prompt, str | list):
            prompts.append(prompt)
        else:
            raise TrainingError(f'prompts {path}: a line must be text or {{"prompt": ...}}, got {line[:80]!r}')
    return prompts


def shuffled(prompts: list[Prompt], seed: int) -> list[Prompt]:
    out = list(prompts)
    random.Random(seed).shuffle(out)
    return out


@dataclass
class Built:
    """An anchor set: (prompt, the base's answer) pairs, and what each source gave and each filter dropped."""

    pairs: list[tuple[Prompt, str]]
    sources: dict[str, int]
    dropped: dict[str, int]


def build(
    model: Any, tokenizer: PreTrainedTokenizerBase, given: dict[str, list[Prompt]], samples: int, filters: Filters,
    max_new_tokens: int, temperature: float = 1.0, seed: int = 0, magpie: bool = True,
) -> Built:  # fmt: skip
    """Answer the ``given`` prompts (by source, in order); with ``magpie``, top the set up to ``samples`` with
    prompts the model writes (half again as many as missing, for the filters); keep at most ``samples`` pairs."""
    model.eval()
    sourced = [(name, p) for name, prompts in given.items() for p in prompts]
    missing, unfinished = samples - len(sourced), 0
    if magpie and missing > 0:
        written = write_prompts(model, tokenizer, missing + missing // 2, max_new_tokens, temperature, seed)
        sourced += [("magpie", p) for p in written if p is not None]
        unfinished = written.count(None)
    answers = answer(model, tokenizer, [p for _, p in sourced], max_new_tokens) if sourced else []
    kept, dropped = keep(list(zip((p for _, p in sourced), answers, strict=True)), filters)
    dropped["unfinished"] += unfinished
    kept = kept[:samples]
    origin = {_flat(p).strip(): name for name, p in reversed(sourced)}
    counts = Counter(origin[_flat(p).strip()] for p, _ in kept)
    return Built(kept, dict(counts), dropped)
