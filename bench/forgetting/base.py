"""The pretrained bases: a tiny chat Llama trained in full on whole conversations of the base skill.

Each sequence is one chat turn rendered with the model's template, ``<|user|>copy abc\\n<|assistant|>abc``
plus EOS, and every token is in the loss (prompt tokens too), as real models are pretrained: the base
learns to answer and to write the user's side, so it can write prompts (Magpie). Cached under
``bench/results/cache/base-<seed>-<key>``, where the key hashes the pretraining settings, the seed, the
code that builds the base (this file, tasks.py, the tiny model and the tokenisation and loss code), the
torch and transformers versions, the CPU and torch's CPU capability (the kernels it dispatches to: AVX2 and
AVX-512 kernels round differently and pretrain different bases): any change to what shapes the base builds a
new one.
``ATEN_CPU_CAPABILITY=avx2`` (torch's own switch) pins the kernels: an AMD AVX-512 machine so pinned gave an
AMD AVX2 machine's figures to the last digit, where an Intel and an AMD machine differed at AVX-512.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamengine.local.tinymodel
import streamengine.training.data
import streamengine.training.losses
from bench.forgetting.tasks import Item, base_items
from streamengine.local.tinymodel import build_tiny_model
from streamengine.training.data import IGNORE_INDEX, Encoded, Example, collate, encode, pad_id
from streamengine.training.losses import forward_logits, sample_losses

RESULTS = Path(__file__).resolve().parents[1] / "results"
CPU = torch.device("cpu")
MAX_LENGTH = 64
PRETRAIN: dict[str, Any] = {"hidden": 128, "layers": 4, "heads": 4, "steps": 1000, "batch": 64, "lr": 2e-3}
# A compact chat template (roles as one letter: "u:copy abc\na:" then the answer), to spend few tokens per turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
_SHAPING = (
    Path(__file__),
    Path(__file__).with_name("tasks.py"),
    Path(streamengine.local.tinymodel.__file__),
    Path(streamengine.training.data.__file__),
    Path(streamengine.training.losses.__file__),
)


def machine() -> dict[str, str]:
    """What the figures depend on beyond the code: the CPU, the kernels torch dispatches to, the libraries."""
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def cache_key(seed: int, settings: dict[str, Any]) -> str:
    """sha256 over everything that shapes the base: settings, seed, code, library versions and CPU kernels."""
    digest = hashlib.sha256(json.dumps({"seed": seed, **settings}, sort_keys=True).encode())
    for path in _SHAPING:
        digest.update(path.read_bytes())
    digest.update(json.dumps(machine(), sort_keys=True).encode())  # the CPU too: the same kernels differed by vendor
    return digest.hexdigest()[:16]


def whole(tokenizer: Any, prompt: str, completion: str) -> Encoded:
    """One chat turn with every token in the loss (prompt tokens too)."""
    encoded = encode(tokenizer, Example("", prompt, completion, 1.0), MAX_LENGTH)
    return replace(encoded, labels=list(encoded.input_ids))


def pretrain(seed: int, settings: dict[str, Any] | None = None, cache: Path = RESULTS / "cache") -> Path:
    """The base pretrained from ``seed`` (built once, then read from the cache)."""
    settings = {**PRETRAIN, **(settings or {})}
    folder = cache / f"base-{seed}-{cache_key(seed, settings)}"
    if (folder / "pretrained.json").is_file():
        return folder
    scratch = folder.with_name(folder.name + ".tmp")
    build_tiny_model(scratch, settings["hidden"], settings["layers"], settings["heads"], seed=seed)
    tok = AutoTokenizer.from_pretrained(scratch)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(scratch)
    model = AutoModelForCausalLM.from_pretrained(scratch)
    _train(model, tok, seed, settings)
    model.save_pretrained(scratch, safe_serialization=True)
    (scratch / "pretrained.json").write_text(json.dumps({"seed": seed, **settings}))
    scratch.rename(folder)
    return folder


def _train(model: Any, tok: Any, seed: int, settings: dict[str, Any]) -> None:
    """AdamW: warm up, hold the peak (the copy skill appears suddenly), then anneal to 5%."""
    torch.manual_seed(seed)
    rng, pad, steps = random.Random(seed + 1), pad_id(tok), settings["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    hold = int(0.7 * steps)

    def factor(s: int) -> float:
        if s < hold:
            return min(1.0, (s + 1) / 20)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - hold) / (steps - hold)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for _ in range(steps):
        batch = collate([whole(tok, p, c) for p, c in base_items(rng, settings["batch"], set())], pad)
        loss = sample_losses(forward_logits(model, batch, CPU), batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def score(model: Any, tok: Any, items: list[Item]) -> dict[str, float]:
    """Completion-token NLL, token accuracy and exact match (every completion token the argmax; teacher-forced,
    the same as greedy decoding)."""
    model.eval()
    batch = collate([encode(tok, Example("", p, c, 1.0), MAX_LENGTH) for p, c in items], pad_id(tok))
    logits = forward_logits(model, batch, CPU)
    targets = batch["labels"][:, 1:]
    counted = targets != IGNORE_INDEX
    right = (logits[:, :-1].argmax(-1) == targets) & counted
    return {
        "loss": float(sample_losses(logits, batch["labels"]).mean()),
        "acc": float((right.sum(1) / counted.sum(1)).mean()),
        "em": float((right | ~counted).all(dim=1).float().mean()),
    }
