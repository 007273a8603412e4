"""One training job, top to bottom: samples + base model (+ parent adapter and Fisher) -> a LoRA adapter.

1. Join the processes (one, or several under torchrun: :mod:`dist`), seed everything, read the samples
   (every line: window, replay and anchor) and the eval sets, load the model (fresh LoRA or the parent
   adapter, trainable; a quantized base must first pass :func:`quant.check_quantized_gradients`).
2. Measure the weighted NLL on the training samples and on every eval set (eval mode, no dropout):
   the "before" numbers, at the parent adapter or the base.
3. Train with AdamW for ``epochs``. Task loss: SFT (each desirable sample's mean token NLL over its
   completion tokens times its weight, over the batch's weight sum) or KTO (:mod:`kto`, against the
   model as it was at step 0). Plus the EWC penalty from the parent's Fisher (:mod:`ewc`) and any
   extra ``penalty``. Each step reports task loss and penalty separately. A NaN or infinite objective
   stops the job with a :class:`TrainingError` naming the step.
4. Measure again ("after"; a NaN or infinite loss on any set is a :class:`TrainingError`), save the
   adapter (PEFT ``adapter_config.json`` + ``adapter_model.safetensors`` only, never pickle), compute
   the exact Fisher of the window's samples at the trained adapter and write ``fisher.safetensors``
   (online EWC: the parent's importances decayed by gamma plus this window's, and the anchor), then
   ``result.json`` last, so its presence marks a complete output.

Run by the worker as a process (the argv of :func:`launch.training_command`): rank 0 prints one JSON
object per stdout line (``progress`` records, then ``result``) and exits 0; on a :class:`TrainingError`
it prints ``{"event": "error", "message": ...}`` and exits 2 (1 for any other crash).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from transformers import set_seed
from transformers.utils import logging as hf_logging

from streamengine.errors import TrainingError
from streamengine.training.data import Encoded, Example, collate, encode, pad_id, read_samples
from streamengine.training.dist import Dist
from streamengine.training.ewc import EwcPenalty
from streamengine.training.fisher import FISHER_FILE, accumulate, fisher_sums, load_fisher, lora_parameters, save_fisher
from streamengine.training.kto import KtoReference, kto_step_loss, mismatched_examples, sequence_logps
from streamengine.training.losses import batch_losses, batches, evaluate, sample_losses, weighted_loss
from streamengine.training.model import dtype_for, load_for_training
from streamengine.training.quant import check_quantized_gradients
from streamengine.training.spec import Progress, TrainResult, TrainSpec, event_line

__all__ = ["batch_losses", "batches", "evaluate", "main", "sample_losses", "train", "weighted_loss"]

ProgressCallback = Callable[[Progress], None]
# A term added to each step's loss, given the model (the EWC penalty is one).
Penalty = Callable[[torch.nn.Module], torch.Tensor]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILE = "result.json"


def _save_adapter(model: PeftModel, output_dir: Path) -> None:
    """PEFT's ``save_pretrained`` into a scratch folder; only the two adapter files are kept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        for name in ADAPTER_FILES:
            if not (Path(scratch) / name).is_file():
                raise TrainingError(f"PEFT did not write {name}")
            shutil.move(str(Path(scratch) / name), output_dir / name)


def _read_training_samples(spec: TrainSpec) -> list[Example]:
    """Positive-weight samples; SFT learns desirable ones only, KTO uses both labels."""
    kto = spec.effective_objective == "kto"
    examples = [e for e in read_samples(spec.samples_path) if e.weight > 0 and (kto or e.label > 0)]
    if not examples:
        kind = "" if kto else "desirable "
        raise TrainingError(f"no {kind}sample with a positive weight in {spec.samples_path}")
    return examples


def _sft_share(
    model: torch.nn.Module, items: list[Encoded], batch_weight: float, pad: int, device: torch.device, world: int
) -> torch.Tensor:
    """This process's share of the batch's weighted SFT loss (the whole loss in one process)."""
    batch = collate(items, pad)
    losses = batch_losses(model, batch, device)
    if world == 1:
        return weighted_loss(losses, batch["weights"])
    return (losses * batch["weights"].to(device)).sum() / batch_weight


def train(spec: TrainSpec, progress: ProgressCallback | None = None, penalty: Penalty | None = None) -> TrainResult:
    """Run one training job (see the module docstring); ``penalty`` is added to every step's loss."""
    started = time.monotonic()
    cfg, objective = spec.training, spec.effective_objective
    dist = Dist.start(cfg.device)
    set_seed(cfg.seed)

    # 1. Samples, eval sets, parent Fisher and model; every input problem surfaces before training.
    examples = _read_training_samples(spec)
    eval_examples = {n: [e for e in read_samples(p) if e.weight > 0 and e.label > 0] for n, p in spec.eval_sets.items()}
    parent_fisher = load_fisher(spec.parent_fisher) if spec.parent_fisher else None
    loaded = load_for_training(spec.base_model, spec.lora, spec.parent_adapter, dist.device, spec.quantization)
    model, device, tokenizer = loaded.model, loaded.device, loaded.tokenizer
    pad = pad_id(tokenizer)
    if spec.quantization != "none":
        check_quantized_gradients(model, spec.quantization, device, dtype_for(device))
    encoded = [encode(tokenizer, e, cfg.max_length) for e in examples]
    scored = [e for e in encoded if e.label > 0] or encoded
    eval_sets = {n: [encode(tokenizer, e, cfg.max_length) for e in exs] for n, exs in eval_examples.items() if exs}
    penalties: list[Penalty] = [penalty] if penalty is not None else []
    if parent_fisher is not None and spec.ewc.lambda_ > 0:
        penalties.append(EwcPenalty(lora_parameters(model), parent_fisher, spec.ewc.lambda_))

    reduce = dist.reduce()

    def measure(items: list[Encoded]) -> float:
        return evaluate(model, dist.shard(items), cfg.batch_size, pad, device, reduce)

    # 2. Before.
    eval_loss_before = measure(scored)
    if not math.isfinite(eval_loss_before):
        raise TrainingError(f"the loss before training is {eval_loss_before}: the model is broken")
    before = {name: measure(items) for name, items in eval_sets.items()}
    reference = None
    if objective == "kto":  # the reference is the model as it is now: the parent adapter, or the base
        kl_encoded = [encode(tokenizer, e, cfg.max_length) for e in mismatched_examples(examples, cfg.seed)]
        logps = sequence_logps(model, encoded, cfg.batch_size, pad, device).cpu()
        kl_logps = sequence_logps(model, kl_encoded, cfg.batch_size, pad, device).cpu()
        reference = KtoReference(logps, kl_logps, kl_encoded)

    # 3. Train.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    step_model, optimizer = dist.prepare(model, optimizer)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    shuffle = torch.Generator().manual_seed(cfg.seed)
    step = tokens = 0
    penalty_value = 0.0
    train_started = time.monotonic()
    model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            epoch_loss = epoch_weight = 0.0
            order = torch.randperm(len(encoded), generator=shuffle).tolist()
            for indices in batches(list(range(len(encoded))), order, cfg.batch_size):
                step += 1
                batch_weight = sum(encoded[i].weight for i in indices)
                # This process's samples; an empty share runs a zero-weight stand-in (DDP needs a backward).
                mine = dist.shard(indices)
                if mine:
                    items = [encoded[i] for i in mine]
                else:
                    mine, items = indices[:1], [replace(encoded[indices[0]], weight=0.0)]
                if reference is not None:
                    ref = reference.select(mine)
                    share, _ = kto_step_loss(step_model, model, items, ref, cfg, batch_weight, pad, device, reduce)
                else:
                    share = _sft_share(step_model, items, batch_weight, pad, device, dist.world)
                extra = sum((p(model) for p in penalties), torch.zeros((), device=device))
                counted = sum(len(e.input_ids) for e in items if e.weight > 0)
                stats = dist.sum(torch.tensor([float(share.detach()), float(counted)], dtype=torch.float64))
                task_value, penalty_value = float(stats[0]), float(extra.detach())
                value = task_value + penalty_value
                if not math.isfinite(value):
                    raise TrainingError(
                        f"training diverged: loss became {value} at step {step}/{total_steps} (epoch {epoch})"
                    )
                optimizer.zero_grad(set_to_none=True)
                dist.backward(share * dist.world + extra)
                optimizer.step()

                tokens += int(stats[1])
                epoch_loss += task_value * batch_weight
                epoch_weight += batch_weight
                if progress is not None and dist.is_main:
                    elapsed = max(time.monotonic() - train_started, 1e-9)
                    progress(
                        Progress(
                            step=step,
                            total_steps=total_steps,
                            epoch=epoch,
                            loss=value,
                            task_loss=task_value,
                            penalty=penalty_value,
                            tokens_per_s=tokens / elapsed,
                            eta_s=elapsed / step * (total_steps - step),
                        )
                    )
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory at step {step}/{total_steps}: {exc}") from None

    # 4. After, the adapter, the Fisher, the result.
    eval_loss_after = measure(scored)
    evals = {
        n: {"before": before[n], "after": measure(items), "samples": float(len(items))}
        for n, items in eval_sets.items()
    }
    # The last update can break the model too; a NaN eval loss must never reach the release gate.
    for name, after in [("training", eval_loss_after)] + [(n, e["after"]) for n, e in evals.items()]:
        if not math.isfinite(after):
            raise TrainingError(f"training diverged: the {name} loss after training is {after}")
    output_dir = Path(spec.output_dir)
    if dist.is_main:
        _save_adapter(model, output_dir)
    fisher_seconds = 0.0
    if spec.compute_fisher:
        fisher_started = time.monotonic()
        window = [enc for enc, ex in zip(encoded, examples, strict=True) if ex.source == "window" and ex.label > 0]
        sums = fisher_sums(model, dist.shard(window), pad, device, cfg.fisher_chunk_size).reduce(reduce)
        anchor = {n: p.detach() for n, p in lora_parameters(model).items()}
        state = accumulate(
            sums.mean(), anchor, parent_fisher, spec.ewc.gamma, spec.ewc.normalize, sums.samples, sums.weight
        )
        if dist.is_main:
            save_fisher(state, output_dir / FISHER_FILE)
        fisher_seconds = time.monotonic() - fisher_started
    result = TrainResult(
        train_loss=epoch_loss / epoch_weight,
        eval_loss_before=eval_loss_before,
        eval_loss_after=eval_loss_after,
        steps=step,
        tokens=tokens,
        seconds=time.monotonic() - started,
        samples=len(encoded),
        eval=evals,
        fisher_seconds=fisher_seconds,
        ewc_penalty=penalty_value,
        objective=objective,
        processes=dist.world,
    )
    if dist.is_main:
        scratch = output_dir / (RESULT_FILE + ".tmp")
        scratch.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        scratch.replace(output_dir / RESULT_FILE)
    dist.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m streamengine.training.recipe SPEC.json``: JSON lines on stdout (rank 0), logs on stderr."""
    args = sys.argv[1:] if argv is None else argv
    stdout = sys.stdout
    speaks = int(os.environ.get("RANK", "0")) == 0

    def emit(line: str) -> None:
        if speaks:
            stdout.write(line + "\n")
            stdout.flush()

    if len(args) != 1:
        emit(event_line("error", {"message": "usage: python -m streamengine.training.recipe SPEC.json"}))
        return 2
    hf_logging.disable_progress_bar()
    sys.stdout = sys.stderr  # whatever a library prints cannot break the JSON lines
    try:
        spec = TrainSpec.read(args[0])
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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    emit(event_line("result", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
