"""Swap latency of a serving node: from an ``adapter.released`` record being produced to the new version
answering in an in-process PEFT model, split into consume, download, verify and swap (+ the first
forward pass, "answer"). Compared, in the same run, with a cold ``PeftModel.from_pretrained``.

Real components: a tansu broker and a SeaweedFS S3 server (streamengine.local.embedded), the Subscriber and
PeftSwapper as a serving node runs them, releases signed with HMAC (so verify = signature + sha256).
Models are built in code with random weights (no downloads): the tiny test model (~0.1M parameters)
and a ~100M Llama (hidden 768, 12 layers). Adapters: LoRA r=16, alpha=32 on q/k/v/o, random weights,
with a fisher.safetensors beside them as real releases have (a serving node does not download it).

    python bench/swap.py                     # both models, hotswap and load_adapter, 20 releases each
    python bench/swap.py --models tiny --releases 10

Prints a table and writes bench/results/swap-<time>.json. torch runs with one intra-op thread by
default (``--threads``): on a small shared machine two threads wait on each other whenever another
process holds a core, which adds tens to hundreds of ms to every forward pass and hides the swap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from streamengine.config.settings import Settings, load_settings
from streamengine.contract.events import AdapterReleased, LoraSpec
from streamengine.core.manifest import Signer, sha256_bytes
from streamengine.core.release import build_release
from streamengine.local.embedded import SeaweedS3, Tansu
from streamengine.serving import PeftSwapper, Subscriber
from streamengine.store.objects import ObjectStore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
KEY = "bench-signing-key"
PROMPT = "Hello, adapter!"
STAGES = ("consume", "download", "verify", "swap", "answer")


def build_model(kind: str, folder: Path) -> Path:
    """``tiny``: the test model; ``100m``: a ~100M-parameter Llama with random weights."""
    from streamengine.local.tinymodel import build_tiny_model

    if kind == "tiny":
        return build_tiny_model(folder)
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_adapters(base: Path, root: Path, count: int) -> tuple[list[Path], int]:
    """``count`` LoRA adapters (random lora_B so each changes the output); returns them and the parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
    )
    params = sum(p.numel() for p in model.base_model.model.parameters())
    folders = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        out = root / f"adapter-{seed}"
        model.save_pretrained(out)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        fisher = {f"importance.{n}": t for n, t in lora.items()} | {f"anchor.{n}": t.clone() for n, t in lora.items()}
        save_file(fisher, str(out / "fisher.safetensors"))
        folders.append(out)
    return folders, params


def release(store: ObjectStore, model: str, folder: Path, version: str) -> AdapterReleased:
    files = {p.name: sha256_bytes(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}
    store.upload_folder(folder, model, version)
    return build_release(
        model=model, version=version, parent_version=None, base_model="bench", uri=store.uri(model, version),
        files=files, size_bytes=sum((folder / n).stat().st_size for n in files),
        lora=LoraSpec(r=16, alpha=32, target_modules=TARGETS), ewc_lambda=500.0, window=None, metrics={},
        reason="threshold", now=datetime.now(UTC), signer=Signer(hmac_key=KEY),
    )  # fmt: skip


async def run_swaps(
    settings: Settings, base: Path, adapters: list[Path], model: str, hotswap: bool
) -> tuple[list[dict[str, float]], list[str]]:
    """Bootstrap on one release, then produce the others one at a time and time each until it answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ObjectStore.from_settings(settings.storage)
    store.ensure_bucket()
    events = [release(store, model, folder, f"v1.{i}") for i, folder in enumerate(adapters)]
    swapper = PeftSwapper(AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base),
                          hotswap=hotswap)  # fmt: skip
    answered: dict[str, tuple[float, float]] = {}

    def on_swap(version: str) -> None:  # the new version answers one request
        began = time.perf_counter()
        swapper.logits(PROMPT)
        answered[version] = (time.time(), time.perf_counter() - began)

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=0)
    await producer.start()
    rows, methods = [], []
    try:
        await producer.send_and_wait(settings.kafka.released_topic, events[0].model_dump_json().encode(),
                                     key=model.encode())  # fmt: skip
        async with Subscriber(settings, swapper, model, store=store, on_swap=on_swap) as sub:
            assert sub.current == "v1.0"
            for event in events[1:]:
                produced = time.time()
                await producer.send_and_wait(settings.kafka.released_topic, event.model_dump_json().encode(),
                                             key=model.encode())  # fmt: skip
                await sub.wait_until(lambda v=event.version: v in answered, 60)
                outcome = sub.outcomes[-1]
                assert outcome.status == "swapped", outcome
                done, answer_s = answered[event.version]
                row = {stage: outcome.stages.get(stage, 0.0) for stage in STAGES[:-1]}
                row.update(answer=answer_s, total=done - produced)
                rows.append(row)
                methods.append(swapper.last_method or "?")
            with torch.no_grad():
                assert swapper.logits(PROMPT).shape[0] > 0
    finally:
        await producer.stop()
    return rows[1:], methods[1:]  # the first live swap fills the second slot (load_adapter): warm-up


def cold_loads(base: Path, adapters: list[Path]) -> list[dict[str, float]]:
    """A fresh process's way: load the base, ``PeftModel.from_pretrained`` the adapter, answer once."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    rows = []
    for folder in adapters:
        began = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        loaded = time.perf_counter()
        peft = PeftModel.from_pretrained(model, str(folder), is_trainable=False).eval()
        wrapped = time.perf_counter()
        with torch.no_grad():
            peft(**inputs)
        done = time.perf_counter()
        rows.append({"base_load": loaded - began, "from_pretrained": wrapped - loaded, "answer": done - wrapped,
                     "total": done - began})  # fmt: skip
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = rows[0].keys() if rows else []
    return {k: {"p50_ms": pct([r[k] for r in rows], 0.5) * 1000, "p95_ms": pct([r[k] for r in rows], 0.95) * 1000,
                "mean_ms": statistics.fmean(r[k] for r in rows) * 1000} for k in keys}  # fmt: skip


def settings_for(tansu: Tansu, s3: SeaweedS3, root: Path) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        kafka={"bootstrap_servers": tansu.bootstrap, "released_topic": f"adapter.released.bench-{suffix}"},
        storage={"endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key,
                 "bucket": f"bench-{suffix}"},
        serving={"download_dir": root / f"serving-{suffix}"},
        signing_key=KEY,
    )  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "releases": args.releases,
        "torch_threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        root = Path(tmp)
        s3 = SeaweedS3(root / "s3", root / "logs")
        tansu = Tansu(root / "logs")
        with s3, tansu:
            for kind in args.models:
                base = build_model(kind, root / f"model-{kind}")
                adapters, params = build_adapters(base, root / f"adapters-{kind}", args.releases + 2)
                adapter_kib = (adapters[0] / "adapter_model.safetensors").stat().st_size / 1024
                for hotswap in (True, False):
                    rows, methods = await run_swaps(settings_for(tansu, s3, root), base, adapters, "bench", hotswap)
                    results["runs"].append({"model": kind, "parameters": params, "adapter_kib": adapter_kib,
                                            "path": "hotswap" if hotswap else "load_adapter", "methods": methods,
                                            "samples": rows, "summary": summary(rows)})  # fmt: skip
                cold = cold_loads(base, adapters[: max(3, min(args.releases, 8))])
                results["runs"].append(
                    {
                        "model": kind,
                        "parameters": params,
                        "adapter_kib": adapter_kib,
                        "path": "cold from_pretrained",
                        "samples": cold,
                        "summary": summary(cold),
                    }
                )
    results["load_average_after"] = os.getloadavg()
    return results


def print_table(results: dict[str, Any]) -> None:
    head = f"{'model':>6} {'params':>7} {'path':<21} {'n':>3}  {'total p50':>9} {'p95':>7}  " + " ".join(
        f"{s:>9}" for s in ("consume", "download", "verify", "swap", "answer")
    )
    print(head + "   (ms; stage columns are p50)")
    for run in results["runs"]:
        s = run["summary"]
        stages = ("base_load", "-", "-", "from_pretrained", "answer") if run["path"].startswith("cold") else STAGES
        cells = " ".join(f"{s[k]['p50_ms']:9.1f}" if k in s else f"{'-':>9}" for k in stages)
        print(f"{run['model']:>6} {run['parameters'] / 1e6:6.1f}M {run['path']:<21} {len(run['samples']):>3}  "
              f"{s['total']['p50_ms']:9.1f} {s['total']['p95_ms']:7.1f}  {cells}")  # fmt: skip
    print("cold rows: 'consume' column = loading the base model, 'swap' = PeftModel.from_pretrained")
    print(
        f"torch threads {results['torch_threads']}, {results['cpus']} CPUs, load average "
        f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} after"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m", type=lambda s: s.split(","), help="tiny and/or 100m")
    parser.add_argument("--releases", type=int, default=20, help="timed live releases per run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    print_table(outcome)
    arguments.out.mkdir(parents=True, exist_ok=True)
    path = arguments.out / f"swap-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(outcome, indent=2))
    print(f"wrote {path}")
