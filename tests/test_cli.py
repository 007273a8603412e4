"""The real `streamengine` console script: help everywhere, one-line errors with the documented exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "streamengine"
PROGRAM = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "streamengine.cli.main"]

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
    "settings",
    "openapi",
    "top",
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


# --- every operational command against a real engine --------------------------------------------------
TOKEN = "cli-test-token-9d2"


@dataclass
class Engine:
    settings: Any
    config: Path
    db: Any
    services: Any
    workdir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(services, tmp_path_factory) -> AsyncIterator[Engine]:  # type: ignore[no-untyped-def]
    from streamengine.local.embedded import acreate_database, adrop_database
    from streamengine.store.db import Database
    from tests import process_tools
    from tests.engine_tools import engine_running
    from tests.settings_tools import clear_environment, module_settings

    workdir = tmp_path_factory.mktemp("cli-engine")
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = await acreate_database(services.pg_admin_dsn, name)
    with pytest.MonkeyPatch.context() as patch:
        clear_environment(patch)
        settings = module_settings(services, dsn, workdir, api={"token": TOKEN}, kafka={"partitions": 1})
        config = process_tools.write_config(settings, workdir / "config.yaml")
        async with engine_running(settings):
            db = await Database.connect(settings.database, migrate=False)
            yield Engine(settings, config, db, services, workdir)
            await db.close()
    await adrop_database(services.pg_admin_dsn, name)


async def cli_run(engine: Engine, *args: str, **env: str) -> Any:
    """The CLI in this process (a thread, so the engine in this loop keeps answering), as a script would run it."""
    from click.testing import CliRunner

    from streamengine.cli.main import cli

    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, cli, list(args), env={"STREAMENGINE_CONFIG": str(engine.config), "COLUMNS": "200", **env}
    )


@pytest.mark.integration
async def test_reads_and_operations_against_a_running_engine(engine: Engine) -> None:
    from tests.engine_tools import add_adapter
    from tests.polling import wait_for

    health = await cli_run(engine, "health")
    assert health.exit_code == 0 and "status: ok" in health.output, health.output
    assert json.loads((await cli_run(engine, "health", "--json")).output)["status"] == "ok"
    status = json.loads((await cli_run(engine, "status", "--json")).output)
    assert (status["model"], status["jobs"], status["open_window"]) == ("tiny-llama", [], None)

    empty = await cli_run(engine, "train")
    assert empty.exit_code == 5 and "HTTP 409" in empty.output, empty.output

    lines = [json.dumps({**VALID, "model": "tiny-llama", "event_id": f"cli-{i}"}) for i in range(3)] + ["{nope"]
    events = engine.workdir / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    produced = await cli_run(engine, "produce", str(events))
    assert produced.exit_code == 1, produced.output  # one invalid line (reported), the 3 valid ones sent
    assert f"{events}:4: invalid_json" in produced.output and "sent 3 records" in produced.output

    async def stored() -> bool:
        data = json.loads((await cli_run(engine, "status", "--json")).output)
        return (data["open_window"] or {}).get("samples") == 3

    await wait_for(stored, 30)
    trained = await cli_run(engine, "train", "--json")
    assert trained.exit_code == 0, trained.output
    job = json.loads(trained.output)
    assert (job["reason"], job["samples"]) == ("manual", 3)
    table = await cli_run(engine, "status")
    assert table.exit_code == 0 and "manual" in table.output and "queued" in table.output, table.output
    assert "production -" in table.output

    assert json.loads((await cli_run(engine, "adapters", "list", "--json")).output) == []
    await add_adapter(engine.db, "v1.0")
    await add_adapter(engine.db, "v1.1", parent_version="v1.0")
    await engine.db.execute(
        "INSERT INTO aliases (model, alias, version) VALUES ('tiny-llama', 'production', 'v1.1'),"
        " ('tiny-llama', 'previous', 'v1.0')"
    )
    listed = await cli_run(engine, "list-adapters")
    assert listed.exit_code == 0 and "v1.1" in listed.output and "production" in listed.output, listed.output
    info = json.loads((await cli_run(engine, "adapter-info", "production", "--json")).output)
    assert info["version"] == "v1.1"
    missing = await cli_run(engine, "adapters", "info", "v9.9")
    assert missing.exit_code == 4 and "streamengine: error: " in missing.output
    deployed = await cli_run(engine, "deploy", "v1.0")
    assert deployed.exit_code == 0 and "tiny-llama v1.0 deployed" in deployed.output, deployed.output
    rolled = json.loads((await cli_run(engine, "adapters", "rollback", "--json")).output)
    assert (rolled["version"], rolled["reason"]) == ("v1.1", "rollback")

    text = await cli_run(engine, "metrics")
    assert text.exit_code == 0, text.output
    closed = r'^streamengine_windows_closed_total\{model="tiny-llama",reason="manual"\} \d+$'
    assert re.search(closed, text.output, re.M)
    samples = json.loads((await cli_run(engine, "metrics", "--json")).output)
    assert {"name": "streamengine_jobs", "labels": {"state": "queued"}, "value": 1.0} in samples


@pytest.mark.integration
async def test_exit_codes_for_auth_validation_and_a_dead_dependency(engine: Engine) -> None:
    refused = await cli_run(engine, "train", STREAMENGINE_API__TOKEN="wrong")
    assert refused.exit_code == 2 and "HTTP 401" in refused.output, refused.output
    invalid = await cli_run(engine, "train", "--min-samples", "0")
    assert invalid.exit_code == 2 and "HTTP 422" in invalid.output and "min_samples" in invalid.output
    usage = await cli_run(engine, "status", "--limit", "many")
    assert usage.exit_code == 2
    engine.services.s3.stop()
    try:
        down = await cli_run(engine, "health")
    finally:
        engine.services.ensure_running()
    assert down.exit_code == 3 and "DOWN" in down.output and "not ready (s3)" in down.output, down.output


@pytest.mark.integration
async def test_settings_lists_every_setting_with_secrets_masked(engine: Engine) -> None:
    from streamengine.config.reference import describe, doc_block, markdown

    shown = await cli_run(engine, "settings", "--json")
    assert shown.exit_code == 0, shown.output
    rows = {r["path"]: r for r in json.loads(shown.output)}
    assert set(rows) == {r.path for r in describe()}
    assert rows["api.token"]["value"] == "***" and TOKEN not in shown.output
    assert engine.services.s3_secret_key not in shown.output
    assert rows["window.max_samples"]["env"] == "STREAMENGINE_WINDOW__MAX_SAMPLES"
    assert rows["ewc.lambda"]["env"] == "STREAMENGINE_EWC__LAMBDA" and rows["ewc.lambda"]["default"] == "500.0"
    assert rows["kafka.bootstrap_servers"]["value"] == engine.settings.kafka.bootstrap_servers
    assert doc_block(ROOT / "docs" / "operations.md") == markdown(describe()), (
        "docs/operations.md's configuration reference is stale: run "
        "`streamengine settings --update-doc docs/operations.md`"
    )
    document = json.loads((await cli_run(engine, "openapi")).output)
    assert document == json.loads((ROOT / "docs" / "openapi.json").read_text())


@pytest.mark.integration
async def test_run_worker_and_subscribe_start_and_stop_cleanly(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests import process_tools
    from tests.engine_tools import health_ok
    from tests.polling import wait_for

    settings = make_settings()
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    run = process_tools.start(["run"], config, tmp_path / "run.log")
    subscriber = process_tools.start(["subscribe", "--print-only"], config, tmp_path / "subscribe.log")
    try:
        log = tmp_path / "run.log"
        await wait_for(lambda: health_ok(settings.api.base_url()), 60, describe=lambda: log.read_text()[-3000:])
        worker = await asyncio.to_thread(
            subprocess.run,
            [*PROGRAM, "--config", str(config), "worker", "--once"],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(STREAMENGINE_METRICS__PORT="0"),
        )
        assert worker.returncode == 0, worker.stderr  # the queue is empty: one look, then exit
    finally:
        run_code = await asyncio.to_thread(process_tools.stop, run)
        subscribe_code = await asyncio.to_thread(process_tools.stop, subscriber)
    assert run_code == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert subscribe_code == 0, (tmp_path / "subscribe.log").read_text()[-3000:]


@pytest.mark.integration  # `up` starts its own broker, S3 server and PostgreSQL
@pytest.mark.slow
def test_up_runs_the_whole_loop_to_a_release(tmp_path: Path) -> None:
    """By default the terminal gets only up's own lines (no training steps, progress bars or notices about
    optional packages); the full log is in the log folder it names."""
    env = clean_env()
    del env["PYTHONWARNINGS"]  # what a newcomer's terminal shows, Python warnings included
    home = tmp_path / "up"
    # 30 events hold 28 trainable samples: one window of 16, so the release is the only job
    args = ["--dir", str(home), "--events", "30", "--window", "16", "--exit-after", "1"]
    result = streamengine("up", *args, cwd=tmp_path, env=env, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RELEASE tiny-llama v1.0" in result.stdout
    assert f"full logs in {home / 'logs'}" in result.stdout
    others = [line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("[up ")]
    assert others == [], "\n".join(others[:20])
    log = (home / "logs" / "streamengine.log").read_text()
    assert "job 1: step 1/" in log and "job 1 released tiny-llama v1.0" in log, log[-3000:]
    database = re.search(r"PostgreSQL database (streamengine_up_\w+)", result.stdout)
    assert database and not asyncio.run(_machine_has_database(database[1]))  # dropped at exit (no --keep-db)


async def _machine_has_database(name: str) -> bool:
    """Whether the machine's PostgreSQL (where `up` makes its database when one answers) holds ``name``."""
    try:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=5)
    except OSError:
        return False  # no server of the machine's: `up` started its own and stopped it
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
