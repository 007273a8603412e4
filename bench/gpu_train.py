"""LoRA + EWC training throughput and MFU of a ~1B Llama on one GPU, beside a plain PEFT LoRA step.

``python -m bench.gpu_train`` builds a Llama with random weights (hidden 2048, 16 layers, 32 heads, 8
KV heads, intermediate 5632, vocab 32000: 0.85B parameters), bf16 on a GPU, and measures in one run,
on the same batches (8 sequences of 2048 tokens, no padding):

- ``plain_peft``: what a user would write: ``from_pretrained`` + ``get_peft_model`` (LoRA r16,
  alpha 32, dropout 0.05 on q/k/v/o), ``model(..., labels=...).loss``, backward, AdamW step;
- ``project_ewc``: streamengine's training path: the model from ``training.model.load_for_training``,
  the recipe's step (``losses.batch_losses`` + ``weighted_loss`` plus the EWC penalty, the loss read
  back every step as the recipe does, backward, AdamW), the penalty an ``ewc.EwcPenalty`` loaded from
  a real ``fisher.safetensors`` written by ``training.fisher`` for this adapter;
- ``project_no_ewc``: the same step without the penalty (what the penalty costs);
- ``fisher_vmap``: the exact Fisher (``fisher.fisher_sums_vmap``, per-sample gradients, chunks of 8)
  over N samples, against ``train_pass``: one forward + backward over the same N samples in batches of
  8 (``bench.fisher_ewc.training_pass``), and ``fisher_loop``: the per-sample loop (``fisher_sums_loop``,
  the reference and the fallback). The EWC phase reads the file of the vmap Fisher (the loop's if vmap
  failed: every phase records its error and the others still run).

Throughput is tokens/s of the best of ``--repeats`` blocks of ``--steps`` steps after ``--warmup``
steps, with ``torch.cuda.synchronize`` around each block; peak memory is ``max_memory_allocated`` per
phase (each phase loads its own model and frees it). MFU = model FLOPs per token x tokens/s / peak
bf16 FLOP/s, with two counts of the FLOPs per token: ``6N`` (the usual convention for training, N =
all parameters but the input embedding, which is a lookup) and ``LoRA`` = 4N + 6 N_lora (the base is
frozen: its backward computes activation gradients only, no weight gradients), each plus the causal
attention 6 * layers * hidden * seq. Peak: 989 TFLOP/s dense bf16 for H100 SXM and H200 (756 for
H100 PCIe), or ``--peak-tflops``.

``--tiny`` (automatic without CUDA) runs a tiny config on the CPU in seconds, for tests. Prints a
table; writes JSON (``--json``, default bench/results/gpu_train.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.fisher_ewc import PeakMemory, training_pass
from streamengine.config.settings import LoraSettings
from streamengine.training.data import IGNORE_INDEX, Batch, Encoded, collate, pad_id
from streamengine.training.ewc import EwcPenalty
from streamengine.training.fisher import (
    FisherSums,
    accumulate,
    fisher_sums_loop,
    fisher_sums_vmap,
    lora_parameters,
    save_fisher,
)
from streamengine.training.losses import batch_losses, weighted_loss
from streamengine.training.model import dtype_for, load_for_training

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """The model and the workload."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    fisher_samples: int


SHAPES = {
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000, seq=2048, batch=8,
                fisher_samples=32),
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=64, batch=4,
                  fisher_samples=8),
}  # fmt: skip

# Dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"table ({key})"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def say(message: str) -> None:
    print(f"[gpu_train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- model and data ------------------------------------------------------------------------------------


def build_base(folder: Path, shape: Shape, device: torch.device) -> dict[str, int]:
    """Write a Llama with random weights (initialised on ``device``, saved in the training dtype) and a ByT5
    tokenizer (``load_for_training`` needs one; the benchmark feeds token ids directly) to ``folder``.
    Returns its parameter counts: ``total``, ``embedding`` (input) and ``n_matmul`` (the rest)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    counts = {"total": sum(p.numel() for p in model.parameters())}
    counts["embedding"] = model.get_input_embeddings().weight.numel()
    counts["n_matmul"] = counts["total"] - counts["embedding"]  # the input embedding is a lookup
    model.to(dtype_for(device)).save_pretrained(folder, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(folder)
    del model
    free(device)
    return counts


def make_samples(shape: Shape, seed: int = 0) -> list[Encoded]:
    """``fisher_samples`` sequences of exactly ``seq`` random tokens; the first quarter is the prompt
    (masked in the labels), the rest the completion. Same length: no padding, the attention stays causal."""
    generator = torch.Generator().manual_seed(seed)
    prompt = shape.seq // 4
    out = []
    for _ in range(shape.fisher_samples):
        ids = torch.randint(3, shape.vocab, (shape.seq,), generator=generator).tolist()
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:], weight=1.0))
    return out


def batches_of(samples: list[Encoded], size: int, pad: int) -> list[Batch]:
    return [collate(samples[i : i + size], pad) for i in range(0, len(samples) - size + 1, size)]


def cycle(items: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from items


def enable_checkpointing(peft_model: Any) -> None:
    """Non-reentrant activation checkpointing on the transformer layers (training mode only)."""
    peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --- measurements --------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured phase; ``error`` holds why it did not finish (the others still run)."""

    tokens_per_s: float | None = None
    step_ms: float | None = None
    seconds: float | None = None
    loss: float | None = None
    penalty: float | None = None
    peak_gib: float | None = None
    peak_above_start_gib: float | None = None
    mfu_6n: float | None = None
    mfu_lora: float | None = None
    attn_implementation: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Run:
    shape: Shape
    device: torch.device
    warmup: int
    steps: int
    repeats: int
    chunk_size: int
    lam: float
    checkpointing: bool
    lora: LoraSettings  # the shipped LoRA unless --targets says otherwise


def throughput(step: Callable[[], Any], run: Run, phase: Phase) -> None:
    """Warm up, then the best of ``repeats`` synchronized blocks of ``steps`` steps (``step`` returns its
    loss, a tensor or a float: only the last one is read back here)."""
    last: Any = None
    with PeakMemory(run.device) as peak:
        for _ in range(run.warmup):
            last = step()
        best = math.inf
        for _ in range(run.repeats):
            sync(run.device)
            started = time.perf_counter()
            for _ in range(run.steps):
                last = step()
            sync(run.device)
            best = min(best, time.perf_counter() - started)
    phase.step_ms = best / run.steps * 1000
    phase.tokens_per_s = run.steps * run.shape.batch * run.shape.seq / best
    phase.loss = float(last)
    _memory(phase, peak)


def _memory(phase: Phase, peak: PeakMemory) -> None:
    phase.peak_gib = peak.peak / GIB
    phase.peak_above_start_gib = peak.mib / 1024


@contextlib.contextmanager
def guarded(phase: Phase, device: torch.device) -> Iterator[None]:
    """Record an exception (an OOM, a missing kernel) in the phase instead of ending the benchmark."""
    try:
        yield
    except Exception as exc:
        phase.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        traceback.print_exc()
    finally:
        free(device)


def plain_peft(base: Path, data: list[Batch], run: Run, counts: dict[str, int]) -> Phase:
    """The baseline: plain transformers + PEFT, the model's own loss, AdamW."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    phase = Phase()
    with guarded(phase, run.device):
        lora = run.lora
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype_for(run.device))
        model = model.to(run.device)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules),
                                                 task_type=TaskType.CAUSAL_LM))  # fmt: skip
        phase.attn_implementation = model.config._attn_implementation
        counts["lora"] = sum(p.numel() for p in lora_parameters(model).values())
        if run.checkpointing:
            enable_checkpointing(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        feed = cycle(data)
        model.train()

        def step() -> float:
            batch = next(feed)
            out = model(input_ids=batch["input_ids"].to(run.device), attention_mask=batch["attention_mask"].to(
                run.device), labels=batch["labels"].to(run.device), use_cache=False)  # fmt: skip
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()

        throughput(step, run, phase)
    return phase


PROJECT_PHASES = ("fisher_vmap", "fisher_loop", "train_pass", "project_ewc", "project_no_ewc")


def project(
    base: Path, samples: list[Encoded], data: list[Batch], run: Run, work: Path, counts: dict[str, int]
) -> dict[str, Phase]:
    """The Fisher (vmap and the per-sample loop), a training pass, and training steps with and without EWC,
    on the project's model. The EWC phase reads the Fisher file of whichever Fisher finished."""
    phases = {name: Phase() for name in PROJECT_PHASES}
    try:
        loaded = load_for_training(str(base), run.lora, None, run.device)
    except Exception as exc:
        for phase in phases.values():
            phase.error = f"loading the model failed: {type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
        return phases
    model, pad = loaded.model, pad_id(loaded.tokenizer)
    counts["lora"] = sum(p.numel() for p in lora_parameters(model).values())
    for phase in phases.values():
        phase.attn_implementation = model.config._attn_implementation
    with torch.no_grad():  # a trained adapter: lora_B is not zero, so every LoRA tensor has a gradient
        generator = torch.Generator(device=run.device).manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, device=run.device) * 0.02)
    fisher = work / "fisher.safetensors"
    for name, compute in (
        ("fisher_vmap", lambda items: fisher_sums_vmap(model, items, pad, run.device, run.chunk_size)),
        ("fisher_loop", lambda items: fisher_sums_loop(model, items, pad, run.device)),
    ):
        with guarded(phases[name], run.device):
            sums = fisher_phase(compute, samples, run, phases[name])
            if not fisher.exists():  # the real file format, read back by the EWC phase
                anchor = {n: p.detach() for n, p in lora_parameters(model).items()}
                save_fisher(accumulate(sums.mean(), anchor, None, 1.0, "sum", sums.samples, sums.weight), fisher)
    if run.checkpointing:
        enable_checkpointing(model)
    with guarded(phases["train_pass"], run.device):
        phase = phases["train_pass"]
        training_pass(model, samples[: min(8, len(samples))], pad, run.device)  # warm-up
        with PeakMemory(run.device) as peak:
            phase.seconds = timed(lambda: training_pass(model, samples, pad, run.device), run.device)
        _memory(phase, peak)
    for name, with_ewc in (("project_ewc", True), ("project_no_ewc", False)):
        with guarded(phases[name], run.device):
            if with_ewc and not fisher.exists():
                raise RuntimeError("no Fisher file: both Fisher phases failed")
            project_steps(model, data, run, fisher, with_ewc, phases[name])
    return phases


def fisher_phase(
    compute: Callable[[list[Encoded]], FisherSums], samples: list[Encoded], run: Run, phase: Phase
) -> FisherSums:
    """Time one exact-Fisher computation over all samples, after a warm-up on the first chunk."""
    compute(samples[: run.chunk_size])
    with PeakMemory(run.device) as peak:
        started = time.perf_counter()
        sums = compute(samples)
        sync(run.device)
        phase.seconds = time.perf_counter() - started
    _memory(phase, peak)
    return sums


def project_steps(model: Any, data: list[Batch], run: Run, fisher: Path, with_ewc: bool, phase: Phase) -> None:
    """The recipe's step: weighted SFT loss (+ the EWC penalty), both read back (the recipe's finiteness
    check and progress report), backward, AdamW."""
    params = lora_parameters(model)
    penalty = EwcPenalty.from_file(model, fisher, run.lam) if with_ewc else None
    optimizer = torch.optim.AdamW(list(params.values()), lr=2e-4, weight_decay=0.0)
    feed = cycle(data)
    model.train()
    last_penalty = 0.0

    def step() -> float:
        nonlocal last_penalty
        batch = next(feed)
        loss = weighted_loss(batch_losses(model, batch, run.device), batch["weights"])
        extra = penalty(model) if penalty is not None else torch.zeros((), device=run.device)
        value, last_penalty = float(loss.detach()), float(extra.detach())
        if not math.isfinite(value + last_penalty):
            raise FloatingPointError(f"loss became {value + last_penalty}")
        optimizer.zero_grad(set_to_none=True)
        (loss + extra).backward()
        optimizer.step()
        return value + last_penalty

    throughput(step, run, phase)
    phase.penalty = last_penalty


# --- FLOPs and the report ------------------------------------------------------------------------------


def flops_per_token(shape: Shape, counts: dict[str, int]) -> dict[str, float]:
    attention = 6.0 * shape.layers * shape.hidden * shape.seq  # causal QK^T and AV, forward + backward
    return {
        "six_n": 6.0 * (counts["n_matmul"] + counts.get("lora", 0)) + attention,
        "lora": 4.0 * counts["n_matmul"] + 6.0 * counts.get("lora", 0) + attention,
        "attention": attention,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure(run: Run, peak: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        base = work / "base"
        say(f"building {run.shape} on {run.device}")
        counts = build_base(base, run.shape, run.device)
        build_s = time.perf_counter() - started
        say(f"built in {build_s:.1f} s; plain PEFT steps")
        samples = make_samples(run.shape)
        data = batches_of(samples, run.shape.batch, 0)
        if not data:
            raise SystemExit(f"--fisher-samples {run.shape.fisher_samples} is smaller than --batch {run.shape.batch}")
        phases = {"plain_peft": plain_peft(base, data, run, counts)}
        say("project path: Fisher (vmap, loop), training pass, steps with and without EWC")
        phases |= project(base, samples, data, run, work, counts)
        say("done")
    flops = flops_per_token(run.shape, counts)
    for phase in phases.values():
        if phase.tokens_per_s and peak:
            phase.mfu_6n = flops["six_n"] * phase.tokens_per_s / (peak * 1e12)
            phase.mfu_lora = flops["lora"] * phase.tokens_per_s / (peak * 1e12)
    return {
        "phases": phases,
        "params": counts,
        "flops_per_token": flops,
        "build_s": build_s,
        "ratios": {
            "ewc_over_plain": ratio(phases["project_ewc"].tokens_per_s, phases["plain_peft"].tokens_per_s),
            "ewc_over_no_ewc": ratio(phases["project_ewc"].tokens_per_s, phases["project_no_ewc"].tokens_per_s),
            "fisher_over_pass": ratio(phases["fisher_vmap"].seconds, phases["train_pass"].seconds),
            "loop_over_fisher": ratio(phases["fisher_loop"].seconds, phases["fisher_vmap"].seconds),
        },
    }


def report(run: Run, peak: float | None, peak_source: str, measured: dict[str, Any]) -> dict[str, Any]:
    import peft
    import transformers

    device = run.device
    return {
        "benchmark": "gpu_train",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "peak_bf16_tflops": peak,
            "peak_source": peak_source,
        },
        "config": {
            **asdict(run.shape),
            "dtype": str(dtype_for(device)).removeprefix("torch."),
            "device": str(device),
            "lora": run.lora.model_dump(),
            "ewc_lambda": run.lam,
            "gradient_checkpointing": run.checkpointing,
            "warmup": run.warmup,
            "steps": run.steps,
            "repeats": run.repeats,
            "fisher_chunk_size": run.chunk_size,
        },
        **{k: v for k, v in measured.items() if k != "phases"},
        "phases": {name: asdict(phase) for name, phase in measured["phases"].items()},
    }


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def table(result: dict[str, Any]) -> str:
    phases, ratios = result["phases"], result["ratios"]
    head = f"{'phase':<16} {'tokens/s':>10} {'step ms':>8} {'seconds':>8} {'MFU 6N':>7} {'MFU LoRA':>8} {'peak GiB':>8}"
    lines = [head, "-" * len(head)]
    for name, p in phases.items():
        lines.append(
            f"{name:<16} {_fmt(p['tokens_per_s'], ',.0f'):>10} {_fmt(p['step_ms'], '.1f'):>8}"
            f" {_fmt(p['seconds'], '.3f'):>8} {_fmt(p['mfu_6n'], '.1%'):>7} {_fmt(p['mfu_lora'], '.1%'):>8}"
            f" {_fmt(p['peak_gib'], '.2f'):>8}" + (f"  ERROR {p['error']}" if p["error"] else "")
        )
    cfg = result["config"]
    lines += [
        "",
        f"project EWC / plain PEFT tokens/s: {_fmt(ratios['ewc_over_plain'], '.3f')}",
        f"project EWC / project no EWC tokens/s: {_fmt(ratios['ewc_over_no_ewc'], '.3f')}",
        f"exact Fisher (vmap) / one training pass ({cfg['fisher_samples']} samples):"
        f" {_fmt(ratios['fisher_over_pass'], '.2f')}; per-sample loop / vmap: {_fmt(ratios['loop_over_fisher'], '.2f')}",
        f"{result['machine']['device']}, {cfg['dtype']}, attention {phases['plain_peft']['attn_implementation']},"
        f" batch {cfg['batch']} x {cfg['seq']}, N = {result['params']['n_matmul'] / 1e6:,.1f}M,"
        f" LoRA {result['params']['lora'] / 1e6:.2f}M, peak {_fmt(result['machine']['peak_bf16_tflops'], '.0f')}"
        f" TFLOP/s ({result['machine']['peak_source']})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (automatic without CUDA)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8; tiny 4)")
    parser.add_argument("--fisher-samples", type=int, help="samples of the Fisher / training pass (default 32; tiny 8)")
    parser.add_argument("--chunk-size", type=int, default=8, help="samples per vmap call of the Fisher (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the best counts (default 3)")
    parser.add_argument("--ewc-lambda", type=float, default=500.0, help="EWC lambda (default 500)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint activations in training")
    parser.add_argument(
        "--targets",
        default=",".join(LoraSettings().target_modules),
        help="LoRA target modules, comma-separated (default: lora.target_modules' default)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s (default: by name)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu_train.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    shape = SHAPES["tiny" if args.tiny or device.type != "cuda" else "1b"]
    overrides = {k: v for k, v in (("seq", args.seq), ("batch", args.batch), ("fisher_samples", args.fisher_samples))
                 if v is not None}  # fmt: skip
    shape = replace(shape, **overrides)
    positive = {**overrides, "chunk_size": args.chunk_size, "steps": args.steps, "repeats": args.repeats}
    for name, value in positive.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    run = Run(shape, device, args.warmup, args.steps, args.repeats, args.chunk_size, args.ewc_lambda,
              args.gradient_checkpointing, LoraSettings(target_modules=args.targets.split(",")))  # fmt: skip
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    result = report(run, peak, peak_source, measure(run, peak))
    print()
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 1 if any(p["error"] for p in result["phases"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
