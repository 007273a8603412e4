"""bench/gpu_train.py end to end on its tiny CPU configuration: every phase runs and the JSON is sane."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import gpu_train


def test_tiny_cpu_run_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    argv = ["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--repeats", "1", "--json", str(out)]

    assert gpu_train.main(argv) == 0

    result = json.loads(out.read_text())
    phases = result["phases"]
    assert set(phases) == {"plain_peft", "fisher_vmap", "fisher_loop", "train_pass", "project_ewc", "project_no_ewc"}
    assert all(p["error"] is None for p in phases.values()), phases
    for name in ("plain_peft", "project_ewc", "project_no_ewc"):
        assert phases[name]["tokens_per_s"] > 0 and phases[name]["step_ms"] > 0
        assert math.isfinite(phases[name]["loss"]) and phases[name]["loss"] > 0
        assert phases[name]["peak_gib"] > 0
    # After a few AdamW steps the adapter has left its anchor: the penalty from the Fisher file is positive.
    assert math.isfinite(phases["project_ewc"]["penalty"]) and phases["project_ewc"]["penalty"] > 0
    assert phases["project_no_ewc"]["penalty"] == 0
    assert all(phases[name]["seconds"] > 0 for name in ("fisher_vmap", "fisher_loop", "train_pass"))
    for name in ("ewc_over_plain", "ewc_over_no_ewc", "fisher_over_pass", "loop_over_fisher"):
        assert result["ratios"][name] > 0, name
    assert result["ratios"]["fisher_over_pass"] == phases["fisher_vmap"]["seconds"] / phases["train_pass"]["seconds"]
    config, params = result["config"], result["params"]
    assert (config["seq"], config["batch"], config["device"], config["lora"]["r"]) == (64, 4, "cpu", 16)
    assert params["total"] == params["n_matmul"] + params["embedding"] and params["lora"] > 0
    # No GPU: no peak FLOP/s, so no MFU, unless one is given.
    assert result["machine"]["peak_bf16_tflops"] is None and phases["plain_peft"]["mfu_6n"] is None


def test_mfu_uses_the_given_peak(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    argv = ["--tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--repeats", "1", "--peak-tflops", "1"]

    assert gpu_train.main([*argv, "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    plain, flops = result["phases"]["plain_peft"], result["flops_per_token"]
    assert plain["mfu_6n"] == flops["six_n"] * plain["tokens_per_s"] / 1e12
    assert plain["mfu_lora"] < plain["mfu_6n"]  # 4N + 6 N_lora < 6 (N + N_lora)
