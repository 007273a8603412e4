"""One training job, top to bottom: samples + base model (+ parent adapter) -> a LoRA adapter.

1. Seed everything, read the samples, load the model (fresh LoRA or the parent adapter, trainable).
2. Measure the weighted eval loss on the samples (eval mode, no dropout).
3. Train with AdamW for ``epochs``: each sample's mean token NLL over its completion tokens times its
   weight, divided by the batch's weight sum, plus an optional penalty (the EWC seam). A loss that
   is NaN or infinite stops the job with a :class:`TrainingError` naming the step.
4. Measure the loss again, save the adapter (PEFT ``adapter_config.json`` + ``adapter_model.safetensors``
   only, never pickle) and write ``result.json`` last, so its presence marks a complete output.

Run as a process by the worker: ``python -m streamengine.training.recipe SPEC.json`` prints one JSON
object per stdout line (``progress`` records, then ``result``) and exits 0; on a :class:`TrainingError`
it prints ``{"event": "error", "message": ...}`` and exits 2 (1 for any other crash).
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import set_seed
from transformers.utils import logging as hf_logging

from streamengine.errors import TrainingError
from streamengine.training.data import IGNORE_INDEX, Batch, Encoded, collate, encode, pad_id, read_samples
from streamengine.training.model import load_for_training
from streamengine.training.spec import Progress, TrainResult, TrainSpec, event_line

ProgressCallback = Callable[[Progress], None]
# A term added to each step's loss, given the model (EWC will be one: lambda/2 * F * (theta - theta*)^2).
Penalty = Callable[[torch.nn.Module], torch.Tensor]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILE = "result.json"


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token NLL ``[B]`` of next-token predictions over the unmasked labels."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (targets != IGNORE_INDEX).float()
    return (nll * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1.0)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w_i * loss_i) / sum(w_i)``: a zero-weight sample changes neither the value nor the gradient."""
    weights = weights.to(losses.device, losses.dtype)
    return (losses * weights).sum() / weights.sum()


def batch_losses(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    return sample_losses(out.logits, batch["labels"].to(device))


def batches(encoded: list[Encoded], order: list[int], size: int) -> Iterator[list[Encoded]]:
    for start in range(0, len(order), size):
        yield [encoded[i] for i in order[start : start + size]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, encoded: list[Encoded], size: int, pad: int, device: torch.device) -> float:
    """Weighted mean of the per-sample losses over all of ``encoded``, in eval mode."""
    was_training = model.training
    model.eval()
    total = weight = 0.0
    for chunk in batches(encoded, list(range(len(encoded))), size):
        batch = collate(chunk, pad)
        losses = batch_losses(model, batch, device)
        total += float((losses * batch["weights"].to(device)).sum())
        weight += float(batch["weights"].sum())
    model.train(was_training)
    return total / weight


def _save_adapter(model: PeftModel, output_dir: Path) -> None:
    """PEFT's ``save_pretrained`` into a scratch folder; only the two adapter files are kept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        for name in ADAPTER_FILES:
            if not (Path(scratch) / name).is_file():
                raise TrainingError(f"PEFT did not write {name}")
            shutil.move(str(Path(scratch) / name), output_dir / name)


def train(spec: TrainSpec, progress: ProgressCallback | None = None, penalty: Penalty | None = None) -> TrainResult:
    """Run one training job (see the module docstring); ``penalty`` is added to every step's loss."""
    started = time.monotonic()
    cfg = spec.training
    set_seed(cfg.seed)

    # Zero-weight samples would contribute nothing; leaving them out keeps every batch's weight sum > 0.
    examples = [e for e in read_samples(spec.samples_path) if e.weight > 0]
    if not examples:
        raise TrainingError(f"no sample with a positive weight in {spec.samples_path}")
    loaded = load_for_training(spec.base_model, spec.lora, spec.parent_adapter, cfg.device)
    model, device, pad = loaded.model, loaded.device, pad_id(loaded.tokenizer)
    encoded = [encode(loaded.tokenizer, e, cfg.max_length) for e in examples]

    eval_loss_before = evaluate(model, encoded, cfg.batch_size, pad, device)
    if not math.isfinite(eval_loss_before):
        raise TrainingError(f"the loss before training is {eval_loss_before}: the model is broken")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    shuffle = torch.Generator().manual_seed(cfg.seed)
    step = tokens = 0
    train_started = time.monotonic()
    model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            epoch_loss = epoch_weight = 0.0
            order = torch.randperm(len(encoded), generator=shuffle).tolist()
            for chunk in batches(encoded, order, cfg.batch_size):
                step += 1
                batch = collate(chunk, pad)
                loss = weighted_loss(batch_losses(model, batch, device), batch["weights"])
                objective = loss + penalty(model) if penalty is not None else loss
                value = float(objective.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"loss became {value} at step {step}/{total_steps} (epoch {epoch})")
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()

                tokens += int(batch["attention_mask"].sum())
                batch_weight = float(batch["weights"].sum())
                epoch_loss += float(loss.detach()) * batch_weight
                epoch_weight += batch_weight
                if progress is not None:
                    elapsed = max(time.monotonic() - train_started, 1e-9)
                    progress(
                        Progress(
                            step=step,
                            total_steps=total_steps,
                            epoch=epoch,
                            loss=value,
                            tokens_per_s=tokens / elapsed,
                            eta_s=elapsed / step * (total_steps - step),
                        )
                    )
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory at step {step}/{total_steps}: {exc}") from None

    eval_loss_after = evaluate(model, encoded, cfg.batch_size, pad, device)
    if not math.isfinite(eval_loss_after):
        raise TrainingError(f"the loss after training is {eval_loss_after}: training diverged")

    output_dir = Path(spec.output_dir)
    _save_adapter(model, output_dir)
    result = TrainResult(
        train_loss=epoch_loss / epoch_weight,
        eval_loss_before=eval_loss_before,
        eval_loss_after=eval_loss_after,
        steps=step,
        tokens=tokens,
        seconds=time.monotonic() - started,
        samples=len(encoded),
    )
    scratch = output_dir / (RESULT_FILE + ".tmp")
    scratch.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    scratch.replace(output_dir / RESULT_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m streamengine.training.recipe SPEC.json``: JSON lines on stdout, logs on stderr."""
    args = sys.argv[1:] if argv is None else argv
    stdout = sys.stdout

    def emit(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    if len(args) != 1:
        emit(event_line("error", {"message": "usage: python -m streamengine.training.recipe SPEC.json"}))
        return 2
    hf_logging.disable_progress_bar()
    sys.stdout = sys.stderr  # whatever a library prints cannot break the JSON lines
    try:
        spec = TrainSpec.read(args[0])
        # The EWC penalty (built from spec.ewc_lambda and the parent's Fisher) plugs in here.
        result = train(spec, progress=lambda p: emit(event_line("progress", p)))
    except TrainingError as exc:
        emit(event_line("error", {"message": str(exc)}))
        return 2
    except Exception as exc:  # a crash: still one structured line for the worker, traceback on stderr
        traceback.print_exc()
        emit(event_line("error", {"message": f"{type(exc).__name__}: {exc}"}))
        return 1
    finally:
        sys.stdout = stdout
    emit(event_line("result", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
