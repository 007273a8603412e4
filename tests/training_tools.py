"""Helpers shared by the training tests: sample files, specs and the recipe as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from streamengine.training.spec import TrainSpec

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def sample_line(
    event_id: str, prompt: Any, completion: str, weight: float = 1.0, label: int = 1, source: str = "window"
) -> str:
    return json.dumps(
        {
            "event_id": event_id,
            "prompt": json.dumps(prompt),
            "completion": completion,
            "weight": weight,
            "label": label,
            "source": source,
        }
    )


def write_samples(path: Path, rows: list[tuple[Any, ...]]) -> Path:
    """``rows``: (prompt, completion[, weight[, label[, source]]]) each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(sample_line(f"e{i}", *row) + "\n" for i, row in enumerate(rows)))
    return path


def make_spec(base: Path, samples: Path, out: Path, **training: Any) -> TrainSpec:
    """A CPU float32 spec for the tiny model (LoRA r8 on q/k/v/o, no dropout, no gradient clipping, a constant
    learning rate: the numbers these tests pin are the recipe's own; clipping and the schedule have their tests)."""
    settings: dict[str, Any] = {"epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "max_length": 128}
    settings |= {"max_grad_norm": None, "lr_schedule": "constant", "warmup_ratio": 0.0}
    settings |= {"seed": 0, "device": "cpu"}
    settings.update(training)
    return TrainSpec(
        base_model=str(base),
        samples_path=str(samples),
        output_dir=str(out),
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        training=settings,
    )


def run_command(argv: list[str], timeout: float = 180) -> tuple[int, list[dict[str, Any]], str]:
    """Run a training command line; returns (exit code, JSON lines of stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return proc.returncode, records, proc.stderr


def write_spec(spec: TrainSpec, path: Path) -> Path:
    spec.write(path)
    return path


def python() -> str:
    return sys.executable


def pretrained_ok_model(folder: Path) -> Path:
    """A tiny chat model fully trained to answer "ok" to "q <word>" (whole sequences in the loss, 60 steps)."""
    from dataclasses import replace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamengine.local.tinymodel import build_tiny_model
    from streamengine.training.data import Example, collate, encode, pad_id
    from streamengine.training.losses import forward_logits, sample_losses

    build_tiny_model(folder, seed=0)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        rows = [encode(tokenizer, Example("", f"q {step}-{i}", "ok", 1.0), 32) for i in range(16)]
        batch = collate([replace(e, labels=e.input_ids) for e in rows], pad_id(tokenizer))
        loss = sample_losses(forward_logits(model, batch, torch.device("cpu")), batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder
