"""One training job, top to bottom: samples + base model (+ parent adapter and Fisher) -> a LoRA adapter.

:func:`train` runs four phases, one function each:

1. :func:`set_up`: join the processes (one, or several under torchrun: :mod:`dist`), seed everything, read
   the samples (every line: window, replay and anchor) and the eval sets, load the model (fresh LoRA or the
   parent adapter, trainable; a quantized base must first pass :func:`quant.check_quantized_gradients`);
   with ``replay_keep``, the replay lines the parent knows best are dropped (:mod:`replay_pick`).
2. :func:`measure_before`: the weighted NLL on the training samples and on every eval set (eval mode, no
   dropout), at the parent adapter or the base, and on the ``base_sets`` at the base itself (adapter off);
   for KTO also the reference log-probabilities.
3. :func:`train_loop`: AdamW for ``epochs`` (with ``anchor_per_epoch``, each epoch a fresh draw of the anchor
   lines: :mod:`rotation`). Task loss: SFT (each desirable sample's mean token NLL over
   its completion tokens times its weight, over the batch's weight sum) or KTO (:mod:`kto`, against the
   model as it was at step 0), plus the distillation term on anchor samples (:mod:`distill`). Plus the EWC
   penalty from the parent's Fisher (:mod:`ewc`), the orthogonality penalty (:mod:`orthogonal`) and any
   extra ``penalty``. Each step reports task loss and penalty separately. A NaN or infinite objective stops
   the job with a :class:`TrainingError` naming the step.
4. :func:`finish`: with ``parent_average``, average the adapter with the parent (:mod:`average`); measure
   again ("after"; a NaN or infinite loss on any set is a :class:`TrainingError`),
   save the adapter (PEFT ``adapter_config.json`` + ``adapter_model.safetensors`` only, never pickle),
   compute the exact Fisher of the window's samples (and of the anchor or replay lines, as ``ewc.fisher_sources``
   says) at the trained adapter and write ``fisher.safetensors`` (online EWC: the parent's importances decayed
   by gamma plus this window's, and the anchor), then
   ``result.json`` last, so its presence marks a complete output.

Run by the worker as a process (the argv of :func:`launch.training_command`): rank 0 prints one JSON
object per stdout line (``phase`` and ``progress`` records, then ``result``) and exits 0; on a
:class:`TrainingError` it prints ``{"event": "error", "message": ...}`` and exits 2 (1 for any other crash).
A warm trainer (:mod:`warm`) runs :func:`train` for job after job in one process, on a base it keeps loaded.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, get_scheduler, set_seed
from transformers.utils import logging as hf_logging

from streamengine.config.settings import TrainingSettings
from streamengine.errors import TrainingError
from streamengine.files import write_text_atomic
from streamengine.training.average import average_with_parent, snapshot
from streamengine.training.data import Encoded, Example, collate, encode, pad_id, read_samples
from streamengine.training.dist import Dist
from streamengine.training.distill import kl_to_base
from streamengine.training.ewc import EwcPenalty
from streamengine.training.fisher import (
    FISHER_FILE,
    FisherState,
    FisherSums,
    accumulate,
    fisher_sums,
    lines_fisher,
    load_fisher,
    lora_parameters,
    save_fisher,
)
from streamengine.training.kto import KtoReference, kto_step_loss, mismatched_examples, sequence_logps
from streamengine.training.losses import batch_losses, batches, evaluate, forward_logits, sample_losses, weighted_loss
from streamengine.training.model import BaseCache, dtype_for, load_for_training
from streamengine.training.orthogonal import OrthogonalPenalty
from streamengine.training.quant import check_quantized_gradients
from streamengine.training.replay_pick import ReplayPick, pick_replay
from streamengine.training.rotation import epoch_rows, lines_per_epoch
from streamengine.training.spec import Progress, TrainResult, TrainSpec, event_line

__all__ = [
    "Before",
    "Setup",
    "Trained",
    "batch_losses",
    "batches",
    "evaluate",
    "finish",
    "main",
    "measure_before",
    "sample_losses",
    "set_up",
    "train",
    "train_loop",
    "weighted_loss",
]

ProgressCallback = Callable[[Progress], None]
# Told the phase the job enters: loading_base (set up), evaluating, training, fisher.
PhaseCallback = Callable[[str], None]
# A term added to each step's loss, given the model (the EWC penalty is one).
Penalty = Callable[[torch.nn.Module], torch.Tensor]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILE = "result.json"


@dataclass
class Setup:
    """What :func:`set_up` prepares: the processes, the model and the encoded samples and eval sets."""

    spec: TrainSpec
    dist: Dist
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    pad: int
    examples: list[Example]
    encoded: list[Encoded]  # every training sample, in file order (``examples`` row for row)
    scored: list[Encoded]  # what the training loss before and after is measured on: the desirable ones
    eval_sets: dict[str, list[Encoded]]
    parent_fisher: FisherState | None
    parent: dict[str, torch.Tensor] | None  # the parent's LoRA values at step 0, kept for orthogonality/averaging
    penalties: list[Penalty]
    replay: ReplayPick
    reduce: Any  # Dist.reduce(): the sum over processes for the loss and Fisher helpers, None in one process

    def measure(self, items: list[Encoded]) -> float:
        """The weighted mean NLL of ``items`` (eval mode), summed over processes."""
        batch_size = self.spec.training.batch_size
        return evaluate(self.model, self.dist.shard(items), batch_size, self.pad, self.device, self.reduce)


@dataclass
class Before:
    """What :func:`measure_before` measured at the parent adapter (or the base)."""

    training: float
    eval: dict[str, float]
    reference: KtoReference | None  # KTO's reference log-probabilities; None for SFT
    base: dict[str, float]  # the spec's base_sets, scored at the base model (adapter off)


@dataclass
class Trained:
    """What :func:`train_loop` reports."""

    train_loss: float  # weighted mean task loss over the last epoch's batches
    steps: int
    tokens: int
    penalty: float  # the last step's


def train(
    spec: TrainSpec,
    progress: ProgressCallback | None = None,
    penalty: Penalty | None = None,
    phase: PhaseCallback | None = None,
    bases: BaseCache | None = None,
) -> TrainResult:
    """Run one training job (see the module docstring); ``penalty`` is added to every step's loss, ``phase``
    hears each phase begin, ``bases``: a warm trainer's loaded bases (see :mod:`warm`)."""
    started = time.monotonic()
    enter = phase or (lambda name: None)
    enter("loading_base")
    setup = set_up(spec, penalty, bases)
    enter("evaluating")
    before = measure_before(setup)
    enter("training")
    trained = train_loop(setup, before.reference, progress)
    enter("evaluating")
    return finish(setup, before, trained, started, enter)


# --- 1. set up ---------------------------------------------------------------------------------------


def set_up(spec: TrainSpec, penalty: Penalty | None = None, bases: BaseCache | None = None) -> Setup:
    """Phase 1: processes, seed, samples, eval sets, parent Fisher and model; every input problem surfaces here."""
    cfg = spec.training
    dist = Dist.start(cfg.device)
    set_seed(cfg.seed)
    examples = _read_training_samples(spec)
    eval_examples = {n: [e for e in read_samples(p) if e.weight > 0 and e.label > 0] for n, p in spec.eval_sets.items()}
    parent_fisher = load_fisher(spec.parent_fisher) if spec.parent_fisher else None
    loaded = load_for_training(spec.base_model, spec.lora, spec.parent_adapter, dist.device, spec.quantization, bases)
    model, device, tokenizer = loaded.model, loaded.device, loaded.tokenizer
    pad = pad_id(tokenizer)
    if spec.quantization != "none":
        check_quantized_gradients(model, spec.quantization, device, dtype_for(device))
    encoded = [encode(tokenizer, e, cfg.max_length) for e in examples]
    rows, replay = pick_replay(model, examples, encoded, spec.replay_keep, dist, cfg.batch_size, pad)
    examples, encoded = [examples[i] for i in rows], [encoded[i] for i in rows]
    eval_sets = {n: [encode(tokenizer, e, cfg.max_length) for e in exs] for n, exs in eval_examples.items() if exs}
    params = lora_parameters(model)
    keeps_parent = spec.parent_adapter is not None and (spec.parent_average > 0 or spec.orthogonal_weight > 0)
    parent = snapshot(params) if keeps_parent else None
    return Setup(
        spec=spec,
        dist=dist,
        model=model,
        tokenizer=tokenizer,
        device=device,
        pad=pad,
        examples=examples,
        encoded=encoded,
        scored=[e for e in encoded if e.label > 0] or encoded,
        eval_sets=eval_sets,
        parent_fisher=parent_fisher,
        parent=parent,
        penalties=_penalties(spec, params, parent_fisher, parent, penalty),
        replay=replay,
        reduce=dist.reduce(),
    )


def _penalties(
    spec: TrainSpec,
    params: dict[str, torch.nn.Parameter],
    parent_fisher: FisherState | None,
    parent: dict[str, torch.Tensor] | None,
    extra: Penalty | None,
) -> list[Penalty]:
    """The terms added to each step's loss: ``extra``, EWC (with a parent Fisher), orthogonality (with a parent)."""
    penalties: list[Penalty] = [extra] if extra is not None else []
    if parent_fisher is not None and spec.ewc.lambda_ > 0:
        penalties.append(EwcPenalty(params, parent_fisher, spec.ewc.lambda_))
    if parent is not None and spec.orthogonal_weight > 0:
        penalties.append(OrthogonalPenalty(params, parent, spec.orthogonal_weight))
    return penalties


def _read_training_samples(spec: TrainSpec) -> list[Example]:
    """Positive-weight samples; SFT learns desirable ones only, KTO uses both labels."""
    kto = spec.training.objective == "kto"
    examples = [e for e in read_samples(spec.samples_path) if e.weight > 0 and (kto or e.label > 0)]
    if not examples:
        kind = "" if kto else "desirable "
        raise TrainingError(f"no {kind}sample with a positive weight in {spec.samples_path}")
    return examples


# --- 2. measure before -------------------------------------------------------------------------------


def measure_before(setup: Setup) -> Before:
    """Phase 2: the losses at the parent adapter (or the base), and KTO's reference (the model as it is now)."""
    training = setup.measure(setup.scored)
    if not math.isfinite(training):
        raise TrainingError(f"the loss before training is {training}: the model is broken")
    before = {name: setup.measure(items) for name, items in setup.eval_sets.items()}
    with setup.model.disable_adapter():
        base = {n: setup.measure(items) for n, items in setup.eval_sets.items() if n in setup.spec.base_sets}
    reference = None
    if setup.spec.training.objective == "kto":
        cfg, model = setup.spec.training, setup.model
        kl_examples = mismatched_examples(setup.examples, cfg.seed)
        kl_encoded = [encode(setup.tokenizer, e, cfg.max_length) for e in kl_examples]
        logps = sequence_logps(model, setup.encoded, cfg.batch_size, setup.pad, setup.device).cpu()
        kl_logps = sequence_logps(model, kl_encoded, cfg.batch_size, setup.pad, setup.device).cpu()
        reference = KtoReference(logps, kl_logps, kl_encoded)
    return Before(training, before, reference, base)


# --- 3. train ----------------------------------------------------------------------------------------


def train_loop(setup: Setup, reference: KtoReference | None, progress: ProgressCallback | None = None) -> Trained:
    """Phase 3: AdamW over ``epochs`` shuffled passes; every step checked, then reported to ``progress``."""
    cfg, dist, encoded = setup.spec.training, setup.dist, setup.encoded
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    step_model, optimizer = dist.prepare(setup.model, optimizer)
    anchors = [i for i, e in enumerate(setup.examples) if e.source == "anchor"]
    per_epoch = lines_per_epoch(len(encoded), anchors, setup.spec.anchor_per_epoch)
    total_steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    schedule = _lr_schedule(cfg, optimizer, total_steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    step = tokens = 0
    penalty = epoch_loss = epoch_weight = 0.0
    train_started = time.monotonic()
    setup.model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            epoch_loss = epoch_weight = 0.0
            rows = epoch_rows(len(encoded), anchors, setup.spec.anchor_per_epoch, shuffle)
            order = torch.randperm(len(rows), generator=shuffle).tolist()
            for indices in batches(rows, order, cfg.batch_size):
                step += 1
                batch_weight = sum(encoded[i].weight for i in indices)
                where = f"step {step}/{total_steps} (epoch {epoch})"
                task, penalty, counted = _step(setup, step_model, optimizer, indices, batch_weight, reference, where)
                schedule.step()
                tokens += counted
                epoch_loss += task * batch_weight
                epoch_weight += batch_weight
                if progress is not None and dist.is_main:
                    elapsed = max(time.monotonic() - train_started, 1e-9)
                    progress(
                        Progress(
                            step=step,
                            total_steps=total_steps,
                            epoch=epoch,
                            loss=task + penalty,
                            task_loss=task,
                            penalty=penalty,
                            tokens_per_s=tokens / elapsed,
                            eta_s=elapsed / step * (total_steps - step),
                        )
                    )
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory at step {step}/{total_steps}: {exc}") from None
    return Trained(train_loss=epoch_loss / epoch_weight, steps=step, tokens=tokens, penalty=penalty)


def _lr_schedule(cfg: TrainingSettings, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """transformers' scheduler of ``training.lr_schedule`` with ``warmup_ratio`` of the steps warming up."""
    warmup = round(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and warmup else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _step(
    setup: Setup,
    step_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    indices: list[int],
    batch_weight: float,
    reference: KtoReference | None,
    where: str,
) -> tuple[float, float, int]:
    """One optimizer step on the batch ``indices``: (task loss, penalty, tokens); a NaN objective raises first."""
    dist, encoded = setup.dist, setup.encoded
    # This process's samples; an empty share runs a zero-weight stand-in (DDP needs a backward).
    mine = dist.shard(indices)
    if mine:
        items = [encoded[i] for i in mine]
    else:
        mine, items = indices[:1], [replace(encoded[indices[0]], weight=0.0)]
    if reference is not None:
        cfg = setup.spec.training
        ref = reference.select(mine)
        share, _ = kto_step_loss(
            step_model, setup.model, items, ref, cfg, batch_weight, setup.pad, setup.device, setup.reduce
        )
    else:
        anchors = torch.tensor([setup.examples[i].source == "anchor" for i in mine])
        share = _sft_share(setup, step_model, items, anchors, batch_weight)
    extra = sum((p(setup.model) for p in setup.penalties), torch.zeros((), device=setup.device))
    counted = sum(len(e.input_ids) for e in items if e.weight > 0)
    stats = dist.sum(torch.tensor([float(share.detach()), float(counted)], dtype=torch.float64))
    task, penalty = float(stats[0]), float(extra.detach())
    if not math.isfinite(task + penalty):
        raise TrainingError(f"training diverged: loss became {task + penalty} at {where}")
    optimizer.zero_grad(set_to_none=True)
    dist.backward(share * dist.world + extra)
    if setup.spec.training.max_grad_norm is not None:  # DDP has averaged the gradients: every rank clips alike
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, setup.spec.training.max_grad_norm)
    optimizer.step()
    return task, penalty, int(stats[1])


def _sft_share(
    setup: Setup, model: torch.nn.Module, items: list[Encoded], anchors: torch.Tensor, batch_weight: float
) -> torch.Tensor:
    """This process's share of the batch's weighted SFT loss (the whole loss in one process); anchor samples
    add the distillation term (:mod:`distill`) when ``distill.weight`` is set."""
    batch, device, distill = collate(items, setup.pad), setup.device, setup.spec.distill
    logits = forward_logits(model, batch, device)
    losses = sample_losses(logits, batch["labels"].to(device))
    if distill.weight > 0:
        losses = losses + distill.weight * kl_to_base(setup.model, logits, batch, anchors, distill.temperature)
    if setup.dist.world == 1:
        return weighted_loss(losses, batch["weights"])
    return (losses * batch["weights"].to(device)).sum() / batch_weight


# --- 4. finish ---------------------------------------------------------------------------------------


def finish(
    setup: Setup, before: Before, trained: Trained, started: float, phase: PhaseCallback | None = None
) -> TrainResult:
    """Phase 4: measure after, then the adapter, the Fisher and ``result.json`` (last: it marks a complete output)."""
    spec, dist = setup.spec, setup.dist
    if setup.parent is not None and spec.parent_average > 0:
        average_with_parent(lora_parameters(setup.model), setup.parent, spec.parent_average)
    eval_loss_after, evals = _measure_after(setup, before)
    output_dir = Path(spec.output_dir)
    if dist.is_main:
        _save_adapter(setup.model, output_dir)
    if spec.compute_fisher and phase is not None:
        phase("fisher")
    fisher_seconds = _write_fisher(setup, output_dir / FISHER_FILE) if spec.compute_fisher else 0.0
    result = TrainResult(
        train_loss=trained.train_loss,
        eval_loss_before=before.training,
        eval_loss_after=eval_loss_after,
        steps=trained.steps,
        tokens=trained.tokens,
        seconds=time.monotonic() - started,
        samples=len(setup.encoded),
        eval=evals,
        fisher_seconds=fisher_seconds,
        ewc_penalty=trained.penalty,
        objective=spec.training.objective,
        processes=dist.world,
        replay_candidates=setup.replay.candidates,
        replay_kept=setup.replay.kept,
        replay_pick_seconds=setup.replay.seconds,
    )
    if dist.is_main:
        write_text_atomic(output_dir / RESULT_FILE, result.model_dump_json(indent=2) + "\n")
    dist.barrier()
    return result


def _measure_after(setup: Setup, before: Before) -> tuple[float, dict[str, dict[str, float]]]:
    """The training loss after, and ``{set: {before, after, samples}}``; a NaN or infinite one raises."""
    training = setup.measure(setup.scored)
    evals = {
        n: {"before": before.eval[n], "after": setup.measure(items), "samples": float(len(items))}
        | ({"base": before.base[n]} if n in before.base else {})
        for n, items in setup.eval_sets.items()
    }
    # The last update can break the model too; a NaN eval loss must never reach the release gate.
    for name, after in [("training", training)] + [(n, e["after"]) for n, e in evals.items()]:
        if not math.isfinite(after):
            raise TrainingError(f"training diverged: the {name} loss after training is {after}")
    return training, evals


def _save_adapter(model: PeftModel, output_dir: Path) -> None:
    """PEFT's ``save_pretrained`` into a scratch folder; only the two adapter files are kept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        for name in ADAPTER_FILES:
            if not (Path(scratch) / name).is_file():
                raise TrainingError(f"PEFT did not write {name}")
            shutil.move(str(Path(scratch) / name), output_dir / name)


def _write_fisher(setup: Setup, path: Path) -> float:
    """The online-EWC Fisher at the trained adapter of the desirable samples from ``ewc.fisher_sources``,
    written to ``path``; returns the seconds it took."""
    started = time.monotonic()
    spec, cfg = setup.spec, setup.spec.training
    pairs = list(zip(setup.encoded, setup.examples, strict=True))

    def sums_of(group: list[Encoded]) -> FisherSums:
        shard = setup.dist.shard(group)
        return fisher_sums(setup.model, shard, setup.pad, setup.device, cfg.fisher_chunk_size).reduce(setup.reduce)

    sums = lines_fisher(pairs, spec.ewc.fisher_sources, spec.ewc.fisher_balance, sums_of)
    anchor = {n: p.detach() for n, p in lora_parameters(setup.model).items()}
    state = accumulate(
        sums.mean(), anchor, setup.parent_fisher, spec.ewc.gamma, spec.ewc.normalize, sums.samples, sums.weight
    )
    if setup.dist.is_main:
        save_fisher(state, path)
    return time.monotonic() - started


# --- the process -------------------------------------------------------------------------------------


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
        result = train(
            spec,
            progress=lambda p: emit(event_line("progress", p)),
            phase=lambda name: emit(event_line("phase", {"phase": name})),
        )
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
