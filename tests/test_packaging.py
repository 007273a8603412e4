"""Packaging: a serving node's install needs neither the engine nor the trainer stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loaded(modules: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has loaded after importing ``modules``."""
    code = f"import sys; import {modules}; print(','.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return out.split(",") if out else []


def test_subscriber_imports_without_engine_or_training_stack() -> None:
    modules = "streamengine.serving.subscriber, streamengine.serving.swappers, streamengine.cli.main"
    assert _loaded(modules, ("faust", "asyncpg", "torch", "transformers", "peft", "fastapi")) == []


def test_worker_imports_without_the_training_stack() -> None:
    """The worker trains in child processes; its own process never loads torch, transformers or peft."""
    assert _loaded("streamengine.jobs.worker", ("torch", "transformers", "peft", "accelerate")) == []


def test_extras_split_serving_engine_and_training() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "faust" not in base and "torch" not in base and "asyncpg" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("peft") for d in extras["serve"]) and not any("faust" in d for d in extras["serve"])
    assert any(d.startswith("faust-streaming") for d in extras["engine"])
    assert project["scripts"]["streamengine"] == "streamengine.cli.main:main"
    assert project["license"]["text"] == "Apache-2.0"
