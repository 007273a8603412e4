"""Exact Fisher and EWC penalty: speed, memory, and the scale that makes lambda mean the same at any size.

``python -m bench.fisher_ewc`` (about a minute on 2 CPU cores) measures, in one run, on a tiny Llama
(hidden 256, 4 layers, LoRA r16 on q/k/v/o: 131k LoRA parameters) and N samples of realistic lengths:

- the exact Fisher (``vmap(grad)``, chunks of 8) against one training pass (forward + backward, batch
  8) over the same N samples, and against the per-sample loop, with its relative error to the loop;
- the EWC penalty's overhead on a plain LoRA step (forward, backward, AdamW step, batch 8);
- the peak memory above the loaded model of the Fisher and of a training pass (sampled RSS on CPU,
  ``max_memory_allocated`` on CUDA).

``--scale`` (several minutes) runs the calibration behind ``ewc.normalize``: for three model sizes
(8k, 65k and 262k LoRA parameters), each pretrained briefly on the base skill of bench.forgetting,
one window (``up``) then a conflicting one (``next``) with EWC at a grid of lambdas, and reports the
lambda at which the first window's forgetting is halved, in the units of each normalisation.

Times are the minimum of interleaved repeats (the machine may be shared). Prints tables; writes
bench/results/fisher_ewc.json (and fisher_scale.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.forgetting.base import RESULTS, pretrain
from bench.forgetting.tasks import window_items, write_jsonl
from streamengine.config.settings import LoraSettings
from streamengine.local.tinymodel import build_tiny_model
from streamengine.training.data import Encoded, Example, collate, encode, pad_id
from streamengine.training.ewc import EwcPenalty
from streamengine.training.fisher import accumulate, fisher_sums_loop, fisher_sums_vmap, load_fisher, lora_parameters
from streamengine.training.losses import batch_losses, weighted_loss
from streamengine.training.model import load_for_training
from streamengine.training.recipe import train
from streamengine.training.spec import TrainSpec

CPU = torch.device("cpu")
MEASURED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # what docs/learning.md's figures were measured on


class PeakMemory:
    """Peak resident memory (CPU, sampled every 2 ms) or peak allocated CUDA memory above the start."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def samples(tok: Any, n: int, seed: int = 0) -> list[Encoded]:
    """Prompts of 20-80 characters, completions of 10-60 (bytes = tokens here), weights 0.5-2."""
    rng = random.Random(seed)
    text = "the quick brown fox jumps over the lazy dog while streams of feedback arrive "
    out = []
    for i in range(n):
        start = rng.randrange(len(text) // 2)
        prompt = (text * 2)[start : start + rng.randint(20, 80)]
        completion = (text * 2)[start + 3 : start + 3 + rng.randint(10, 60)]
        out.append(encode(tok, Example(str(i), prompt, completion, rng.choice([0.5, 1.0, 2.0])), 256))
    return out


def best_of(repeats: int, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Minimum wall time of each function over interleaved repeats (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def setup(n: int, hidden: int, layers: int, device: torch.device) -> tuple[Any, Any, list[Encoded]]:
    """The benchmark model (LoRA r16 on q/k/v/o with a non-zero B, like a trained adapter) and samples."""
    with tempfile.TemporaryDirectory() as folder:
        base = build_tiny_model(folder, hidden_size=hidden, layers=layers, heads=4)
        loaded = load_for_training(
            str(base), LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=MEASURED_TARGETS), None, device
        )
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model, tok, samples(tok, n)


def training_pass(model: Any, encoded: list[Encoded], pad: int, device: torch.device) -> None:
    """Forward and backward over all of ``encoded`` in batches of 8 (no optimizer step)."""
    model.train()
    for start in range(0, len(encoded), 8):
        batch = collate(encoded[start : start + 8], pad)
        weighted_loss(batch_losses(model, batch, device), batch["weights"]).backward()
    model.zero_grad(set_to_none=True)


def memory_child(what: str, n: int, hidden: int, layers: int, chunk: int, device: torch.device) -> float:
    """Peak memory (MiB) of one ``what`` above the loaded model, in this (fresh) process."""
    model, tok, encoded = setup(n, hidden, layers, device)
    pad = pad_id(tok)
    run = {
        "train_pass": lambda: training_pass(model, encoded, pad, device),
        "fisher_vmap": lambda: fisher_sums_vmap(model, encoded, pad, device, chunk),
        "fisher_loop": lambda: fisher_sums_loop(model, encoded, pad, device),
    }[what]
    with PeakMemory(device) as peak:
        run()
    return peak.mib


def speed(n: int, hidden: int, layers: int, chunk: int, repeats: int, device: torch.device) -> dict[str, Any]:
    model, tok, encoded = setup(n, hidden, layers, device)
    pad = pad_id(tok)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
    fisher = accumulate(fisher_sums_vmap(model, encoded[:16], pad, device, chunk).mean(),
                        {k: p.detach() for k, p in params.items()}, None, 1.0, "sum")  # fmt: skip
    penalty = EwcPenalty(params, fisher, 500.0)
    batch = collate(encoded[:8], pad)

    def step(with_penalty: bool) -> None:
        model.train()
        loss = weighted_loss(batch_losses(model, batch, device), batch["weights"])
        if with_penalty:
            loss = loss + penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def penalty_alone() -> None:
        for p in params.values():
            p.grad = None
        penalty(model).backward()

    times = best_of(repeats, {
        "train_pass": lambda: training_pass(model, encoded, pad, device),
        "fisher_vmap": lambda: fisher_sums_vmap(model, encoded, pad, device, chunk),
        "fisher_loop": lambda: fisher_sums_loop(model, encoded, pad, device),
    })  # fmt: skip
    steps = best_of(repeats * 5, {"plain_step": lambda: step(False), "ewc_step": lambda: step(True),
                                  "penalty_fwd_bwd": penalty_alone})  # fmt: skip
    fast, loop = (
        fisher_sums_vmap(model, encoded, pad, device, chunk).mean(),
        fisher_sums_loop(model, encoded, pad, device).mean(),
    )
    error = math.sqrt(
        sum(float(((fast[k] - loop[k]) ** 2).sum()) for k in loop) / sum(float((v**2).sum()) for v in loop.values())
    )
    peaks = {}
    for what in ("train_pass", "fisher_vmap", "fisher_loop"):  # each in a fresh process: allocators keep memory
        argv = [sys.executable, "-m", "bench.fisher_ewc", "--memory-child", what, "--samples", str(n), "--hidden",
                str(hidden), "--layers", str(layers), "--chunk-size", str(chunk), "--device", str(device)]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        peaks[what] = float(out.stdout.strip().splitlines()[-1])
    return {
        "samples": n, "hidden": hidden, "layers": layers, "chunk_size": chunk, "device": str(device),
        "lora_parameters": sum(p.numel() for p in params.values()),
        "tokens": sum(len(e.input_ids) for e in encoded),
        **{f"{k}_s": v for k, v in times.items()},
        **{f"{k}_ms": 1000 * v for k, v in steps.items()},
        "fisher_over_train": times["fisher_vmap"] / times["train_pass"],
        "loop_over_fisher": times["fisher_loop"] / times["fisher_vmap"],
        "relative_error": error,
        "ewc_overhead": steps["ewc_step"] / steps["plain_step"] - 1,
        "penalty_share": steps["penalty_fwd_bwd"] / steps["plain_step"],
        "peak_mib": peaks,
    }  # fmt: skip


# --- the lambda scale across model sizes ------------------------------------------------------------

SIZES = [(64, 2, 8), (128, 4, 16), (256, 4, 32)]  # hidden, layers, LoRA rank
LAMBDAS = [0.0, 100.0, 1000.0, 1e4, 1e5, 1e6]  # in "sum" units


def scale(seed: int, steps: int) -> dict[str, Any]:
    """Lambda at which the first window's forgetting halves, per model size (normalize=sum units)."""
    up, following = window_items("conflict", seed + 11, 160, 40, 0)[:2]
    (up_train, up_hold), (next_train, next_hold) = (up.train, up.holdout), (following.train, following.holdout)
    out: dict[str, Any] = {"lambdas_sum_units": LAMBDAS, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="fisher-scale-") as work_dir:
        work = Path(work_dir)
        a_path = write_jsonl(work / "a.jsonl", [(i, "window") for i in up_train])
        b_path = write_jsonl(work / "b.jsonl", [(i, "window") for i in next_train])
        holds = {"a": write_jsonl(work / "ha.jsonl", [(i, "window") for i in up_hold]),
                 "b": write_jsonl(work / "hb.jsonl", [(i, "window") for i in next_hold])}  # fmt: skip
        for hidden, layers, rank in SIZES:
            base = pretrain(seed, {"steps": steps, "hidden": hidden, "layers": layers})
            lora = {"r": rank, "alpha": 2 * rank, "dropout": 0.0}
            common = {"batch_size": 16, "learning_rate": 3e-3, "max_length": 48, "device": "cpu", "epochs": 8}
            first = TrainSpec(base_model=str(base), samples_path=a_path, output_dir=str(work / f"a{hidden}"),
                              lora=lora, training=common, eval_sets=holds)  # fmt: skip
            first_result = train(first)
            state = load_fisher(work / f"a{hidden}" / "fisher.safetensors")
            count = sum(t.numel() for t in state.importance.values())
            rows = []
            for lam in LAMBDAS:
                spec = first.model_copy(update={
                    "samples_path": b_path, "output_dir": str(work / f"b{hidden}"), "parent_adapter": first.output_dir,
                    "parent_fisher": str(work / f"a{hidden}" / "fisher.safetensors"), "compute_fisher": False,
                    "ewc": first.ewc.model_copy(update={"lambda_": lam}),
                })  # fmt: skip
                result = train(spec)
                rows.append({"lambda": lam, "forgetting_a": result.eval["a"]["after"] - result.eval["a"]["before"],
                             "gain_b": result.eval["b"]["before"] - result.eval["b"]["after"]})  # fmt: skip
                print(f"  h{hidden} lambda {lam:g}: {rows[-1]}", flush=True)
            half = halving_lambda(rows)
            out["sizes"].append({
                "hidden": hidden, "layers": layers, "rank": rank, "lora_parameters": count,
                "raw_mean": float(state.meta["raw_mean"]), "a_after_first": first_result.eval["a"]["after"],
                "rows": rows, "lambda50_sum": half,
                "lambda50_mean": half / count if half else None,
                "lambda50_none": half / (count * float(state.meta["raw_mean"])) if half else None,
            })  # fmt: skip
    return out


def halving_lambda(rows: list[dict[str, float]]) -> float | None:
    """Log-interpolated lambda where forgetting falls to half its lambda-0 value (None if it never does)."""
    target = rows[0]["forgetting_a"] / 2
    for low, high in itertools.pairwise(rows[1:]):
        if low["forgetting_a"] > target >= high["forgetting_a"]:
            t = (low["forgetting_a"] - target) / (low["forgetting_a"] - high["forgetting_a"])
            return float(math.exp(math.log(low["lambda"]) + t * (math.log(high["lambda"]) - math.log(low["lambda"]))))
    if rows[1]["forgetting_a"] <= target:
        return rows[1]["lambda"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", action="store_true", help="also run the lambda-scale calibration (minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fisher_ewc.json")
    parser.add_argument("--memory-child", choices=["train_pass", "fisher_vmap", "fisher_loop"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_child:
        print(memory_child(args.memory_child, args.samples, args.hidden, args.layers, args.chunk_size, device))
        return 0
    r = speed(args.samples, args.hidden, args.layers, args.chunk_size, args.repeats, device)
    peaks = r["peak_mib"]
    rows = [
        ("one training pass (fwd+bwd, batch 8)", f"{r['train_pass_s']:.3f} s", ""),
        (
            f"exact Fisher, vmap (chunk {r['chunk_size']})",
            f"{r['fisher_vmap_s']:.3f} s = {r['fisher_over_train']:.2f}x the pass",
            "<= 1.0x",
        ),
        ("exact Fisher, per-sample loop", f"{r['fisher_loop_s']:.3f} s = {r['loop_over_fisher']:.2f}x vmap", ">= 1.5x"),
        ("relative error, vmap vs loop", f"{r['relative_error']:.1e}", "< 1e-5"),
        (
            "plain LoRA step / with EWC (batch 8)",
            f"{r['plain_step_ms']:.1f} / {r['ewc_step_ms']:.1f} ms = {100 * r['ewc_overhead']:+.1f}%",
            "< 3%",
        ),
        (
            "EWC penalty forward+backward alone",
            f"{r['penalty_fwd_bwd_ms']:.2f} ms = {100 * r['penalty_share']:.1f}% of a step",
            "< 3%",
        ),
        (
            "peak memory above the model: pass / Fisher / loop",
            f"{peaks['train_pass']:.0f} / {peaks['fisher_vmap']:.0f} / {peaks['fisher_loop']:.0f} MiB",
            "",
        ),
    ]
    print(f"\n{r['samples']} samples, {r['tokens']} tokens, {r['lora_parameters']} LoRA parameters, {r['device']}\n")
    print("| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    report: dict[str, Any] = {"speed": r}
    if args.scale:
        calibration = scale(0, 700)
        report["scale"] = calibration
        print("\n| LoRA parameters | raw mean F | lambda50, sum units | mean units | raw units |")
        print("|---|---|---|---|---|")
        for size in calibration["sizes"]:
            keys = ("lambda50_sum", "lambda50_mean", "lambda50_none")
            cells = [f"{size[k]:.3g}" if size[k] else "n/a" for k in keys]
            print(f"| {size['lora_parameters']} | {size['raw_mean']:.2e} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
