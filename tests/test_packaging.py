"""Packaging: a serving node's install needs neither the engine nor the trainer stack."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.kafka_tools import read_all

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = ("faust", "asyncpg", "torch", "transformers", "peft", "fastapi", "uvicorn", "croniter", "accelerate")
"""Modules of the extras (engine, serve, train): a serving node's base install has none of them."""


def _project() -> dict[str, Any]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])


def _loaded(modules: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has loaded after importing ``modules``."""
    code = f"import sys; import {modules}; print(','.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return out.split(",") if out else []


def test_subscriber_imports_without_engine_or_training_stack() -> None:
    modules = "streamengine.serving.subscriber, streamengine.serving.swappers, streamengine.cli.main"
    assert _loaded(modules, EXTRAS_ONLY) == []


def test_worker_imports_without_the_training_stack() -> None:
    """The worker trains in child processes; its own process never loads torch, transformers or peft."""
    assert _loaded("streamengine.jobs.worker", ("torch", "transformers", "peft", "accelerate")) == []


def test_extras_split_serving_engine_and_training() -> None:
    project = _project()
    base = " ".join(project["dependencies"])
    assert "faust" not in base and "torch" not in base and "asyncpg" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("peft") for d in extras["serve"]) and not any("faust" in d for d in extras["serve"])
    assert any(d.startswith("faust-streaming") for d in extras["engine"])
    assert project["scripts"]["streamengine"] == "streamengine.cli.main:main"
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # SPDX (PEP 639)


# A serving node's program on the base install: one thumbs-up through the threaded producer; then which
# modules and which installed distributions it loaded (beyond those of a bare interpreter).
_SEND_ONE = """
import json, sys
from importlib.metadata import packages_distributions
before = set(sys.modules)
from streamengine.config.settings import load_settings
from streamengine.serving import SyncFeedbackProducer
with SyncFeedbackProducer(load_settings()) as feedback:
    delivered = feedback.send(prompt="2+2?", response="4", kind="thumbs_up", user_id="u-base").result(30)
loaded = {name.split(".")[0] for name in set(sys.modules) - before} - set(sys.stdlib_module_names)
owners = packages_distributions()
print(json.dumps({"event_id": delivered.record.event_id, "modules": sorted(loaded),
                  "distributions": sorted({d for name in loaded for d in owners.get(name, [])})}))
"""


def _base_distributions() -> set[str]:
    """The base dependencies of pyproject.toml and everything they require (no extras), installed names."""
    pending = [Requirement(dependency).name for dependency in _project()["dependencies"]]
    found = {"streamengine"}
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for need in map(Requirement, needs):
            if need.marker is None or need.marker.evaluate({"extra": ""}):
                pending.append(need.name)
    return found


@pytest.mark.integration
async def test_the_feedback_producer_runs_on_the_base_install(make_settings) -> None:  # type: ignore[no-untyped-def]
    k = make_settings().kafka
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMENGINE_")}
    env["STREAMENGINE_KAFKA__BOOTSTRAP_SERVERS"] = k.bootstrap_servers
    env["STREAMENGINE_KAFKA__FEEDBACK_TOPIC"] = k.feedback_topic
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _SEND_ONE], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert not set(report["modules"]) & set(EXTRAS_ONLY)
    assert {canonicalize_name(d) for d in report["distributions"]} <= _base_distributions()
    records = await read_all(k.bootstrap_servers, k.feedback_topic)
    assert [dict(r.headers)["ce_id"].decode() for r in records] == [report["event_id"]]
