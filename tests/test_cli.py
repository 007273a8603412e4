"""The real `streamengine` console script: help everywhere, one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "streamengine"
PROGRAM = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "streamengine.cli"]

COMMANDS = [
    "run",
    "worker",
    "up",
    "subscribe",
    "produce",
    "train",
    "status",
    "metrics",
    "health",
    "adapters",
    "adapters list",
    "adapters info",
    "adapters deploy",
    "adapters rollback",
    "list-adapters",
    "adapter-info",
    "deploy",
    "contract",
]
VALID = {"event_id": "e1", "model": "m", "prompt": "p", "response": "r", "kind": "thumbs_up", "user_id": "u"}
Result = subprocess.CompletedProcess[str]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMENGINE_")}
    env.update(NO_COLOR="1", COLUMNS="120", PYTHONWARNINGS="ignore", **extra)
    return env


def streamengine(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> Result:
    return subprocess.run(
        [*PROGRAM, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stderr_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@dataclass
class Runs:
    """Every invocation of this module, started at once (each costs a fresh interpreter) and awaited by the tests."""

    workdir: Path
    futures: dict[str, Future[Result]]

    def __getitem__(self, name: str) -> Result:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "bad.yaml").write_text("window: [\n")
    lines = [
        json.dumps(VALID),
        "not json",
        "",
        json.dumps({**VALID, "event_id": "e2", "kind": "rating"}),
        json.dumps({**VALID, "event_id": "e3"}),
    ]
    (workdir / "events.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "invalid.jsonl").write_text('[1]\n{"event_id": "x"}\n')
    copy = workdir / "contract-copy"
    for name in ("schemas", "topics"):
        shutil.copytree(ROOT / name, copy / name)
    api_url = f"http://127.0.0.1:{closed_port()}"
    kafka = clean_env(STREAMENGINE_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")

    jobs: dict[str, tuple[list[str], Path, dict[str, str]]] = {
        f"help {name}": ([*name.split(), "--help"], workdir, clean_env()) for name in ["", *COMMANDS]
    }
    jobs.update(
        {
            "bad setting": (["status"], workdir, clean_env(STREAMENGINE_WINDOW__MAX_SAMPLES="zero")),
            "missing config": (["--config", str(workdir / "missing.yaml"), "status"], workdir, clean_env()),
            "malformed config": (["status"], workdir, clean_env(STREAMENGINE_CONFIG=str(workdir / "bad.yaml"))),
            "api down": (["status"], workdir, clean_env(STREAMENGINE_API__URL=api_url)),
            "produce": (["produce", str(workdir / "events.jsonl")], workdir, kafka),
            "produce invalid": (["produce", str(workdir / "invalid.jsonl")], workdir, kafka),
            "contract": (["contract", "--check"], ROOT, clean_env()),
            "contract drift": (["contract", "--check", "--root", str(copy)], workdir, clean_env()),
        }
    )
    with ThreadPoolExecutor(max_workers=max(4, (os.cpu_count() or 1) * 2)) as pool:
        futures = {name: pool.submit(streamengine, *args, cwd=cwd, env=env) for name, (args, cwd, env) in jobs.items()}
        yield Runs(workdir, futures)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(runs: Runs, command: str) -> None:
    result = runs[f"help {command}"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: streamengine {command} ")
    assert result.stderr == ""


def test_top_level_help_lists_the_commands(runs: Runs) -> None:
    result = runs["help "]
    assert result.returncode == 0 and result.stdout.startswith("Usage: streamengine ")
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert {c for c in COMMANDS if " " not in c} <= listed


def test_bad_setting_is_one_line_and_exit_2(runs: Runs) -> None:
    result = runs["bad setting"]
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamengine: error: ")
    assert "window.max_samples (STREAMENGINE_WINDOW__MAX_SAMPLES)" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_or_malformed_config_file_is_exit_2(runs: Runs) -> None:
    missing = runs["missing config"]
    assert missing.returncode == 2
    path = runs.workdir / "missing.yaml"
    assert stderr_lines(missing) == [f"streamengine: error: config file {path} does not exist"]
    malformed = runs["malformed config"]
    assert malformed.returncode == 2
    assert len(stderr_lines(malformed)) == 1 and "not valid YAML" in malformed.stderr
    assert "Traceback" not in malformed.stderr


def test_status_with_the_admin_api_down_is_one_line_and_exit_3(runs: Runs) -> None:
    result = runs["api down"]
    assert result.returncode == 3
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        r"streamengine: error: admin API at http://127\.0\.0\.1:\d+ is unreachable: ConnectError", lines[0]
    )
    assert result.stdout == ""


def test_produce_reports_bad_lines_and_an_unreachable_broker(runs: Runs) -> None:
    result = runs["produce"]
    events = runs.workdir / "events.jsonl"
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith(f"{events}:2: invalid_json: ")
    assert lines[1].startswith(f"{events}:4: schema: ")
    assert "kind 'rating' needs a 'rating'" in lines[1]
    assert re.match(r"streamengine: error: Kafka at 127\.0\.0\.1:\d+ is unreachable: ", lines[2])
    assert [line for line in lines if "kafka" in line.lower()] == [lines[2]]
    assert result.returncode == 3
    assert result.stdout == ""


def test_produce_with_only_invalid_lines_sends_nothing_and_exits_1(runs: Runs) -> None:
    result = runs["produce invalid"]
    events = runs.workdir / "invalid.jsonl"
    assert result.returncode == 1
    assert stderr_lines(result) == [
        f"{events}:1: schema: value is not a JSON object",
        f"{events}:2: schema: model: Field required; prompt: Field required; response: Field required; "
        "kind: Field required",
    ]
    assert result.stdout == "sent 0 records to feedback.events; 2 invalid lines\n"


def test_contract_check_passes_in_the_repo_root(runs: Runs) -> None:
    result = runs["contract"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == "contract files match the code\n"


def test_contract_check_fails_on_drift(runs: Runs) -> None:
    result = runs["contract drift"]
    assert result.returncode == 1
    assert "asyncapi.yaml" in result.stderr and "streamengine contract --write" in result.stderr
