"""Does each window improve the model without erasing what came before? The proof experiment.

``python -m bench.forgetting`` (a few minutes on 2 CPU cores; ``--quick`` for a smoke run, ``--sweep``
for the lambda / replay grid the defaults were chosen from). Deterministic for a given seed.

1. Base knowledge: a tiny Llama (hidden 128, 4 layers, byte tokenizer, 0.75M parameters) is
   pretrained in full (700 steps) on a base skill, ``copy <word>`` -> ``<word>`` and ``low <WORD>`` ->
   ``<word>``, to 99% exact match on held-out words (cached under bench/results/cache/).
2. Windows, two cases, each four windows of 160 training and 40 held-out samples (random words):
   - ``conflict``: each window teaches its own instruction to copy the word and end it with its own
     mark (``bang w`` -> ``w!!``, ``ask w`` -> ``w??``, ``dots w`` -> ``w..``, ``star w`` -> ``w**``):
     the same skill with conflicting endings, so learning one overwrites the others.
   - ``shared``: four new instructions that all mean the same (``bang``, ``yell``, ``shout``, ``cheer``
     -> ``w!!``): windows that share structure (a style learned once, reused).
3. Methods, every job through the product's own code (``recipe.train``: LoRA r16 on q/k/v/o, the
   exact Fisher at the end of each job, EWC from the parent's ``fisher.safetensors``, replay and anchor
   lines mixed into the samples file as the worker does): ``naive`` sequential LoRA, ``ewc``,
   ``replay``, ``ewc+replay``, ``replay+anchor`` (base-skill samples as the anchor set), and ``joint``
   (one job on all windows, the upper bound).
4. After the last window: NLL and exact match (greedy; computed teacher-forced, which is the same
   thing for argmax decoding) on every window's holdout, on the base skill, and the newest window.

Writes bench/results/forgetting.json and prints the tables (pasted into docs/learning.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamengine.local.tinymodel import build_tiny_model
from streamengine.training.data import IGNORE_INDEX, Example, collate, encode, pad_id
from streamengine.training.losses import forward_logits, sample_losses
from streamengine.training.recipe import train
from streamengine.training.spec import TrainSpec

RESULTS = Path(__file__).resolve().parent / "results"
LETTERS = string.ascii_lowercase
Item = tuple[str, str]  # (prompt, completion)

LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TRAINING = {"batch_size": 16, "learning_rate": 3e-3, "max_length": 48, "device": "cpu"}


def _suffix(end: str) -> Callable[[str], str]:
    return lambda word: word + end


# (instruction, transformation, alphabet of the words)
CONFLICT: list[tuple[str, Callable[[str], str], str]] = [
    ("bang", _suffix("!!"), LETTERS),
    ("ask", _suffix("??"), LETTERS),
    ("dots", _suffix(".."), LETTERS),
    ("star", _suffix("**"), LETTERS),
]
SHARED: list[tuple[str, Callable[[str], str], str]] = [
    (op, _suffix("!!"), LETTERS) for op in ("bang", "yell", "shout", "cheer")
]
CASES = {"conflict": CONFLICT, "shared": SHARED}


def words(rng: random.Random, alphabet: str, n: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6)))
        if word not in avoid:
            avoid.add(word)
            out.append(word)
    return out


def base_items(rng: random.Random, n: int, avoid: set[str]) -> list[Item]:
    return [
        (f"copy {w}", w) if i % 2 == 0 else (f"low {w.upper()}", w) for i, w in enumerate(words(rng, LETTERS, n, avoid))
    ]


def window_items(case: str, seed: int, train_n: int, holdout_n: int) -> list[tuple[list[Item], list[Item]]]:
    rng, seen = random.Random(seed), set[str]()
    out = []
    for op, fn, alphabet in CASES[case]:
        items = [(f"{op} {w}", fn(w)) for w in words(rng, alphabet, train_n + holdout_n, seen)]
        out.append((items[:train_n], items[train_n:]))
    return out


def write_jsonl(path: Path, rows: list[tuple[Item, str]]) -> str:
    lines = [
        json.dumps({"event_id": f"s{i}", "prompt": json.dumps(p), "completion": c, "weight": 1.0, "source": src})
        for i, ((p, c), src) in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- the base model ---------------------------------------------------------------------------------


def pretrain(folder: Path, steps: int, seed: int = 0, hidden: int = 128, layers: int = 4) -> Path:
    """Build the tiny Llama and train all of it on the base skill (cached by folder name)."""
    if (folder / "pretrained.json").is_file():
        return folder
    build_tiny_model(folder, hidden_size=hidden, layers=layers, heads=4, seed=seed, chat_template=False)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    rng, pad = random.Random(seed + 1), pad_id(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # Warm up, hold the peak (the copy skill appears suddenly, ~150-200 steps in), then anneal.
    hold = int(0.7 * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / 20)
            if s < hold
            else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - hold) / (steps - hold)))
        ),
    )
    model.train()
    for _ in range(steps):
        batch = collate([encode(tok, Example("", p, c, 1.0), 48) for p, c in base_items(rng, 64, set())], pad)
        loss = sample_losses(forward_logits(model, batch, torch.device("cpu")), batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "pretrained.json").write_text(json.dumps({"steps": steps, "seed": seed}))
    return folder


@torch.no_grad()
def score(model: Any, tok: Any, items: list[Item]) -> dict[str, float]:
    """Mean NLL over completion tokens and exact match (every completion token is the argmax)."""
    model.eval()
    batch = collate([encode(tok, Example("", p, c, 1.0), 48) for p, c in items], pad_id(tok))
    logits = forward_logits(model, batch, torch.device("cpu"))
    targets = batch["labels"][:, 1:]
    hit = (logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE_INDEX)
    return {"loss": float(sample_losses(logits, batch["labels"]).mean()), "em": float(hit.all(dim=1).float().mean())}


# --- the methods ------------------------------------------------------------------------------------


def run_method(
    base: Path, case: str, windows: list[tuple[list[Item], list[Item]]], base_holdout: list[Item],
    anchor_pool: list[Item], work: Path, lam: float, replay: float, anchor: float, epochs: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Train the windows one after another (each job continues from the previous adapter and Fisher)."""
    rng = random.Random(seed)
    eval_paths = {f"w{k + 1}": write_jsonl(work / f"holdout{k + 1}.jsonl", [(i, "window") for i in hold])
                  for k, (_, hold) in enumerate(windows)}  # fmt: skip
    eval_paths["base"] = write_jsonl(work / "holdout-base.jsonl", [(i, "window") for i in base_holdout])
    parent: Path | None = None
    curve: list[dict[str, float]] = []
    seconds = 0.0
    for k, (train_items, _) in enumerate(windows):
        rows = [(item, "window") for item in train_items]
        pool = [item for earlier, _ in windows[:k] for item in earlier]
        n = len(train_items)
        if replay > 0 and pool:
            rows += [(item, "replay") for item in rng.sample(pool, min(len(pool), round(replay / (1 - replay) * n)))]
        if anchor > 0:
            rows += [(item, "anchor") for item in rng.sample(anchor_pool, round(anchor / (1 - anchor) * n))]
        out = work / f"v{k + 1}"
        spec = TrainSpec(
            base_model=str(base),
            parent_adapter=str(parent) if parent else None,
            parent_fisher=str(parent / "fisher.safetensors") if parent and lam > 0 else None,
            samples_path=write_jsonl(work / f"train{k + 1}.jsonl", rows),
            output_dir=str(out),
            lora=LORA,
            training={**TRAINING, "epochs": epochs, "seed": seed},
            ewc={"lambda": lam},
            eval_sets={name: path for name, path in eval_paths.items() if name == "base" or int(name[1:]) <= k + 1},
            compute_fisher=lam > 0,
        )
        result = train(spec)
        seconds += result.seconds
        curve.append({name: numbers["after"] for name, numbers in result.eval.items()})
        parent = out
    assert parent is not None
    return {"final": evaluate_adapter(base, parent, windows, base_holdout), "curve": curve, "seconds": seconds}


def run_joint(base: Path, windows: list[tuple[list[Item], list[Item]]], base_holdout: list[Item], work: Path,
              epochs: int, seed: int) -> dict[str, Any]:  # fmt: skip
    rows = [(item, "window") for train_items, _ in windows for item in train_items]
    spec = TrainSpec(
        base_model=str(base), samples_path=write_jsonl(work / "joint.jsonl", rows), output_dir=str(work / "joint"),
        lora=LORA, training={**TRAINING, "epochs": epochs, "seed": seed}, compute_fisher=False,
    )  # fmt: skip
    result = train(spec)
    return {
        "final": evaluate_adapter(base, work / "joint", windows, base_holdout),
        "curve": [],
        "seconds": result.seconds,
    }


def evaluate_adapter(base: Path, adapter: Path, windows: list[tuple[list[Item], list[Item]]],
                     base_holdout: list[Item]) -> dict[str, dict[str, float]]:  # fmt: skip
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = {f"w{k + 1}": score(model, tok, hold) for k, (_, hold) in enumerate(windows)}
    out["base"] = score(model, tok, base_holdout)
    return out


def summarise(final: dict[str, dict[str, float]], k: int) -> dict[str, float]:
    earlier = [final[f"w{i}"] for i in range(1, k)]
    return {
        "earlier_em": sum(s["em"] for s in earlier) / len(earlier),
        "earlier_loss": sum(s["loss"] for s in earlier) / len(earlier),
        "newest_em": final[f"w{k}"]["em"],
        "newest_loss": final[f"w{k}"]["loss"],
        "base_em": final["base"]["em"],
        "base_loss": final["base"]["loss"],
    }


def mean_of(values: list[Any]) -> Any:
    """Element-wise mean of equally shaped nested dicts of floats."""
    first = values[0]
    if isinstance(first, dict):
        return {k: mean_of([v[k] for v in values]) for k in first}
    return sum(values) / len(values)


def sd_of(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def table(case: str, rows: dict[str, dict[str, Any]], k: int) -> str:
    head = "| method | " + " | ".join(f"w{i} EM (loss)" for i in range(1, k + 1))
    lines = [f"case `{case}`", "", head + " | earlier EM (sd) | newest EM | base EM (loss) |", "|" + "---|" * (k + 4)]
    for name, row in rows.items():
        final, summary = row["final"], row["summary"]
        cells = [f"{final[f'w{i}']['em']:.2f} ({final[f'w{i}']['loss']:.2f})" for i in range(1, k + 1)]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {summary['earlier_em']:.2f} ({row['earlier_em_sd']:.2f}) | "
            f"{summary['newest_em']:.2f} | {final['base']['em']:.2f} ({final['base']['loss']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "forgetting.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="data and training seeds (mean reported)")
    parser.add_argument("--lambda", dest="lam", type=float, default=500.0, help="EWC lambda of the ewc methods")
    parser.add_argument("--replay", type=float, default=0.25, help="replay share of each job's samples")
    parser.add_argument("--anchor", type=float, default=0.1, help="anchor share in the +anchor methods")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cases", default="conflict,shared")
    parser.add_argument("--sweep", action="store_true", help="lambda x replay grid instead of the method table")
    parser.add_argument("--sweep-lambda", type=float, nargs="+", default=[0.0, 100.0, 1000.0, 1e4, 1e5])
    parser.add_argument("--sweep-replay", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer samples, steps and epochs")
    args = parser.parse_args(argv)
    train_n, holdout_n, epochs = (48, 16, 2) if args.quick else (160, 40, args.epochs)
    started = time.monotonic()
    steps = 120 if args.quick else 700
    base = pretrain(RESULTS / "cache" / f"base-0-{steps}", steps)  # one base model for every seed
    if args.sweep:
        methods = {f"lambda={lam:g} replay={rep:g}": (lam, rep, 0.0)
                   for rep in args.sweep_replay for lam in args.sweep_lambda}  # fmt: skip
    else:
        methods = {
            "naive": (0.0, 0.0, 0.0),
            "ewc": (args.lam, 0.0, 0.0),
            "replay": (0.0, args.replay, 0.0),
            "ewc+replay": (args.lam, args.replay, 0.0),
            "replay+anchor": (0.0, args.replay, args.anchor),
            "ewc+replay+anchor": (args.lam, args.replay, args.anchor),
        }
    config = {**vars(args), "out": str(args.out), "train_n": train_n, "holdout_n": holdout_n, "lora": LORA,
              "training": TRAINING, "pretrain_steps": steps}  # fmt: skip
    report: dict[str, Any] = {"config": config, "cases": {}}
    tables = []
    for case in args.cases.split(","):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*methods, *([] if args.sweep else ["joint"])]}
        for seed in args.seeds:
            windows = window_items(case, seed + 11, train_n, holdout_n)
            rng = random.Random(seed + 7)
            base_holdout, anchor_pool = base_items(rng, holdout_n, set()), base_items(rng, 4 * train_n, set())
            for name in runs:
                with tempfile.TemporaryDirectory(prefix="forgetting-") as work:
                    if name == "joint":
                        run = run_joint(base, windows, base_holdout, Path(work), epochs, seed)
                    else:
                        lam, rep, anc = methods[name]
                        run = run_method(base, case, windows, base_holdout, anchor_pool, Path(work), lam, rep, anc,
                                         epochs, seed)  # fmt: skip
                run["summary"] = summarise(run["final"], len(windows))
                runs[name].append(run)
                print(f"{case} seed {seed} {name}: {json.dumps(run['summary'])} ({run['seconds']:.0f} s)", flush=True)
        rows = {
            name: {
                "settings": dict(zip(("lambda", "replay", "anchor"), methods.get(name, (0.0, 0.0, 0.0)), strict=True)),
                "final": mean_of([r["final"] for r in seeds]),
                "summary": mean_of([r["summary"] for r in seeds]),
                "earlier_em_sd": sd_of([r["summary"]["earlier_em"] for r in seeds]),
                "seeds": seeds,
            }
            for name, seeds in runs.items()
        }
        report["cases"][case] = rows
        tables.append(table(case, rows, len(CASES[case])))
    report["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s ({len(args.seeds)} seed(s)); JSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
