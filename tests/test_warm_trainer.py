"""The warm trainer on the real tiny Llama: a kept base left exactly as loaded, warm results equal to cold ones,
and the process kept, reused, given another base and replaced (job limit, memory) as the worker runs it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from prometheus_client import REGISTRY  # noqa: E402

from streamengine.config.settings import WorkerSettings  # noqa: E402
from streamengine.jobs.warm_trainer import WarmTrainer  # noqa: E402
from streamengine.local.tinymodel import build_tiny_model  # noqa: E402
from streamengine.training.launch import training_command  # noqa: E402
from streamengine.training.model import BaseCache  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from streamengine.training.spec import Progress, TrainSpec  # noqa: E402
from streamengine.training.warm_protocol import Preload  # noqa: E402
from tests.training_tools import make_spec, run_command, write_samples, write_spec  # noqa: E402

ADAPTER = "adapter_model.safetensors"
SAMPLES = [(f"Question {i}?", f"Answer {i}.") for i in range(8)]


def _spec(base: Path, samples: Path, out: Path, parent: Path | None = None, fisher: bool = True) -> TrainSpec:
    spec = make_spec(base, samples, out, epochs=1, batch_size=4, max_length=48)
    return spec.model_copy(update={"parent_adapter": str(parent) if parent else None, "compute_fisher": fisher})


def _digest(model: Any) -> str:
    """sha256 over every tensor of ``model``'s state (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_a_kept_base_is_unchanged_after_20_jobs_and_warm_jobs_equal_cold_ones(tiny_model: Path, tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    bases = BaseCache(1)
    _, base = bases.get(str(tiny_model), torch.device("cpu"), "none")
    loaded = _digest(base)
    specs, parent = [], None
    for i in range(20):  # fresh LoRAs and parents' adapters in turn, the Fisher on some
        spec = _spec(tiny_model, samples, tmp_path / f"warm-{i}", parent if i % 2 else None, fisher=i < 4)
        train(spec, bases=bases)
        bases.restore()
        specs.append(spec)
        parent = Path(spec.output_dir)
    assert _digest(base) == loaded
    assert bases.loads == 1 and not any("lora" in name for name, _ in base.named_modules())

    for i in (2, 3):  # the third job (a fresh LoRA) and the fourth (on its parent), each in a process of its own
        cold = specs[i].model_copy(update={"output_dir": str(tmp_path / f"cold-{i}")})
        code, lines, stderr = run_command(training_command(write_spec(cold, tmp_path / f"cold-{i}.json")))
        assert code == 0, stderr[-2000:]
        warm_bytes = (Path(specs[i].output_dir) / ADAPTER).read_bytes()
        assert (Path(cold.output_dir) / ADAPTER).read_bytes() == warm_bytes
        cold_result = next(line for line in lines if line["event"] == "result")
        warm_result = json.loads((Path(specs[i].output_dir) / "result.json").read_text())
        for name in ("train_loss", "eval_loss_before", "eval_loss_after"):
            assert abs(cold_result[name] - warm_result[name]) <= 1e-6


class Recorder:
    """The phases and steps a job reported."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.steps = 0

    async def phase(self, name: str) -> None:
        self.phases.append(name)

    async def progress(self, record: Progress) -> None:
        self.steps += 1


def _restarts(reason: str) -> float:
    return REGISTRY.get_sample_value("streamengine_trainer_restarts_total", {"reason": reason}) or 0.0


@pytest.mark.slow
async def test_the_warm_trainer_keeps_its_base_takes_another_and_is_replaced_at_its_limits(
    tiny_model: Path, tmp_path: Path
) -> None:
    other = build_tiny_model(tmp_path / "other-base", seed=1)
    samples = write_samples(tmp_path / "samples.jsonl", SAMPLES)
    settings = WorkerSettings(work_dir=tmp_path, warm_bases=1, max_jobs_per_process=3)
    trainer = WarmTrainer(settings, tmp_path / "trainer.log")
    trainer.prewarm(Preload(base_model=str(tiny_model), device="cpu"))
    limit_restarts, memory_restarts = _restarts("job_limit"), _restarts("memory")

    async def job(name: str, base: Path) -> tuple[bool, list[str], bytes]:
        spec, seen = _spec(base, samples, tmp_path / name), Recorder()
        result, warm = await trainer.train(spec, tmp_path / f"{name}.log", seen.progress, seen.phase)
        assert seen.steps == result.steps == 2
        return warm, seen.phases, (tmp_path / name / ADAPTER).read_bytes()

    try:
        first = await trainer.ready()
        assert first is not None and (first.jobs, first.bases, first.base_loads) == (0, [str(tiny_model)], 1)

        warm, phases, adapter = await job("one", tiny_model)  # the base loaded before the job: warm
        assert warm
        assert phases == ["waiting_for_trainer", "setting_up", "evaluating", "training", "evaluating", "fisher"]

        warm, phases, _ = await job("two", other)  # another base replaces the one kept, same process
        assert not warm and phases[1] == "loading_base"
        status = await trainer.ready()
        assert status is not None and (status.pid, status.jobs, status.bases) == (first.pid, 2, [str(other)])

        await job("three", tiny_model)  # the third job: the process is replaced, its successor loads the base
        status = await trainer.ready()
        assert status is not None and status.pid != first.pid and (status.jobs, status.bases) == (0, [str(tiny_model)])
        assert _restarts("job_limit") == limit_restarts + 1

        trainer.settings = settings.model_copy(update={"warm_max_rss_mb": 64})  # far below what it holds
        warm, _, again = await job("four", tiny_model)
        assert warm and again == adapter  # the same spec and seed, another process: the same adapter
        replaced = await trainer.ready()
        assert replaced is not None and replaced.pid != status.pid and _restarts("memory") == memory_restarts + 1
    finally:
        await trainer.close()
    assert await trainer.ready() is None
