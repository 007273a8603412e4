"""Packaging: a serving node's install needs neither the engine nor the trainer stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_subscriber_imports_without_engine_or_training_stack() -> None:
    code = (
        "import sys; import streamengine.serving.subscriber, streamengine.serving.swappers, streamengine.cli.main;"
        "names = ('faust', 'asyncpg', 'torch', 'transformers', 'peft', 'fastapi');"
        "heavy = sorted(m for m in names if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_extras_split_serving_engine_and_training() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "faust" not in base and "torch" not in base and "asyncpg" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("peft") for d in extras["serve"]) and not any("faust" in d for d in extras["serve"])
    assert any(d.startswith("faust-streaming") for d in extras["engine"])
    assert project["scripts"]["streamengine"] == "streamengine.cli.main:main"
    assert project["license"]["text"] == "Apache-2.0"
