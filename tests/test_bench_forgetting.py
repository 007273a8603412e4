"""bench.forgetting's bookkeeping: the base cache key names the CPU kernels, and reports of two machines never pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.forgetting import __main__ as forgetting
from bench.forgetting.base import PRETRAIN, cache_key, machine

ROOT = Path(__file__).resolve().parents[1]


def _key_and_capability(capability: str) -> tuple[str, str]:
    """The base-0 cache key and torch's CPU capability in a fresh interpreter run with ATEN_CPU_CAPABILITY."""
    code = (
        "from bench.forgetting.base import PRETRAIN, cache_key, machine; "
        "print(cache_key(0, PRETRAIN), machine()['cpu_capability'])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    key, seen = out.stdout.split()[-2:]
    return key, seen


def test_the_cache_key_changes_with_torchs_cpu_kernels() -> None:
    """AVX2 and AVX-512 kernels pretrain different bases: the generic kernels get a key of their own."""
    native = machine()["cpu_capability"]
    assert cache_key(0, PRETRAIN) == cache_key(0, PRETRAIN)  # deterministic
    assert cache_key(0, PRETRAIN) != cache_key(1, PRETRAIN)
    key, seen = _key_and_capability("default")
    assert seen == "DEFAULT"
    if native == "DEFAULT":
        pytest.skip("this CPU has no vector kernels to switch off")
    assert key != cache_key(0, PRETRAIN)


def _report(cpu_capability: str | None, em: float) -> dict[str, Any]:
    run = {"base": 0, "seed": 0, "final": {"w1": {"em": em, "acc": em, "loss": 1 - em}}, "summary": {"newest_em": em}}
    config: dict[str, Any] = {"sizes": {"train_n": 96}, "training": {"epochs": 32}, "bases": [0], "seeds": [0, 1],
                              "rows": ["naive"]}  # fmt: skip
    if cpu_capability:
        config["machine"] = {**machine(), "cpu_capability": cpu_capability}
    return {"config": config, "pretrain_seconds": {}, "seconds": 1.0, "cases": {"conflict": {"naive": {"runs": [run]}}}}


def test_join_pools_one_machines_reports_and_refuses_two() -> None:
    joined = forgetting.join([_report("AVX2", 1.0), _report("AVX2", 0.5)])
    assert joined["cases"]["conflict"]["naive"]["summary"]["newest_em"] == pytest.approx(0.75)
    assert joined["config"]["machine"]["cpu_capability"] == "AVX2"
    with pytest.raises(SystemExit, match=r"--join: the reports' machine differ.*AVX2.*AVX512"):
        forgetting.join([_report("AVX2", 1.0), _report("AVX512", 0.5)])
    # Reports from before config.machine name none and pool as they did.
    assert len(forgetting.join([_report(None, 1.0), _report("AVX2", 0.5)])["cases"]["conflict"]["naive"]["runs"]) == 2


def test_merge_refuses_another_machines_rows() -> None:
    into, earlier = _report("AVX512", 1.0), _report("AVX2", 0.5)
    earlier["cases"]["conflict"]["default"] = earlier["cases"]["conflict"].pop("naive")
    with pytest.raises(SystemExit, match="--merge: the reports' machine differ"):
        forgetting.merge(into, earlier)
    earlier["config"]["machine"] = into["config"]["machine"]
    forgetting.merge(into, earlier)
    assert set(into["cases"]["conflict"]) == {"naive", "default"}
