"""The admin API and CLI of an engine serving several model lines: GET /models and `streamengine models` list
every line, a route that acts on one line takes it, and refuses to guess when several are served."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from streamengine.local.embedded import acreate_database, adrop_database
from streamengine.store.db import Database
from tests import process_tools
from tests.engine_tools import add_samples, engine_running
from tests.settings_tools import clear_environment, module_settings

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-lines"
MODELS = [
    {"name": "alpha"},
    {"name": "beta", "base": "org/other-base", "window": {"max_samples": 7}},
    {"pattern": "tenant-*", "window": {"max_samples": 5}},
]


@dataclass
class Engine:
    http: httpx.AsyncClient
    config: Path
    db: Database


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(services, tmp_path_factory) -> AsyncIterator[Engine]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("lines-api")
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = await acreate_database(services.pg_admin_dsn, name)
    with pytest.MonkeyPatch.context() as patch:
        clear_environment(patch)
        settings = module_settings(services, dsn, workdir, api={"token": TOKEN}, models=MODELS)
        config = process_tools.write_config(settings, workdir / "config.yaml")
        async with engine_running(settings) as http:
            db = await Database.connect(settings.database, migrate=False)
            yield Engine(http, config, db)
            await db.close()
    await adrop_database(services.pg_admin_dsn, name)


async def cli_run(engine: Engine, *args: str) -> Any:
    from click.testing import CliRunner

    from streamengine.cli.main import cli

    env = {"STREAMENGINE_CONFIG": str(engine.config), "COLUMNS": "200"}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


async def test_models_lists_named_lines_and_pattern_lines_with_windows(engine: Engine) -> None:
    await add_samples(engine.db, 0, 2, model="tenant-x")
    response = await engine.http.get("/models")
    assert response.status_code == 200, response.text
    lines = {line["model"]: line for line in response.json()}
    assert list(lines) == ["alpha", "beta", "tenant-x"]
    assert lines["beta"]["base_model"] == "org/other-base" and lines["beta"]["window"]["max_samples"] == 7
    assert lines["tenant-x"]["pattern"] == "tenant-*" and lines["tenant-x"]["window"]["max_samples"] == 5
    assert "pattern" not in lines["alpha"]

    table = await cli_run(engine, "models")
    assert table.exit_code == 0, table.output
    assert all(name in table.output for name in ("alpha", "beta", "tenant-x", "tenant-*", "org/other-base"))
    assert [line["model"] for line in json.loads((await cli_run(engine, "models", "--json")).output)] == list(lines)


async def test_a_route_on_one_line_takes_it_and_refuses_to_guess(engine: Engine) -> None:
    response = await engine.http.get("/training/status")
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "several model lines" in message and all(n in message for n in ("alpha", "beta", "tenant-*"))

    for line in ("beta", "tenant-y"):
        status = await engine.http.get("/training/status", params={"model": line})
        assert status.status_code == 200 and status.json()["model"] == line, status.text
    unknown = await engine.http.get("/adapters", params={"model": "gamma"})
    assert unknown.status_code == 404 and "alpha, beta, tenant-*" in unknown.json()["message"], unknown.text
    train = await engine.http.post("/train", json={"min_samples": 1})
    assert train.status_code == 400 and "several model lines" in train.json()["message"], train.text

    guessed = await cli_run(engine, "status")
    assert guessed.exit_code != 0 and "several model lines" in guessed.output, guessed.output
    named = await cli_run(engine, "status", "--model", "beta", "--json")
    assert named.exit_code == 0 and json.loads(named.output)["model"] == "beta", named.output
    adapters = await cli_run(engine, "list-adapters", "--model", "gamma")
    assert adapters.exit_code == 4 and "gamma" in adapters.output, adapters.output
