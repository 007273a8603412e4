"""The admin API over real HTTP, served by a real engine (Kafka, PostgreSQL, S3) in this event loop."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from streamengine.api.app import openapi_document
from streamengine.api.routers.health import HEALTH_TIMEOUT_S
from streamengine.config.settings import Settings
from streamengine.engine import run_engine
from streamengine.errors import ConfigError
from streamengine.local.embedded import acreate_database, adrop_database
from streamengine.store import job_queue
from streamengine.store.db import Database
from tests.engine_tools import add_adapter, add_samples, engine_running, metric
from tests.kafka_tools import read_all
from tests.polling import wait_for
from tests.settings_tools import clear_environment, module_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-admin-token-5b1f"


@dataclass
class Api:
    settings: Settings
    http: httpx.AsyncClient  # sends the token
    anonymous: httpx.AsyncClient
    db: Database
    services: Any
    pg_name: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(services, tmp_path_factory) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = await acreate_database(services.pg_admin_dsn, name)
    with pytest.MonkeyPatch.context() as patch:
        clear_environment(patch)
        settings = module_settings(services, dsn, tmp_path_factory.mktemp("api"), api={"token": TOKEN})
        async with engine_running(settings) as http:
            db = await Database.connect(settings.database, migrate=False)
            async with httpx.AsyncClient(base_url=settings.api.base_url(), timeout=30) as anonymous:
                yield Api(settings, http, anonymous, db, services, name)
            await db.close()
    await adrop_database(services.pg_admin_dsn, name)


def _error(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error and body["message"], body
    return str(body["message"])


async def test_health_reports_each_dependency(api: Api) -> None:
    response = await api.anonymous.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"kafka", "postgres", "s3", "ingest", "engine"}
    assert all(check["ok"] for check in body["checks"].values())
    assert (await api.anonymous.get("/health/live")).json() == {"status": "ok"}


async def test_a_dead_s3_gives_503_fast_naming_it_without_secrets(api: Api) -> None:
    api.services.s3.stop()
    try:
        started = time.monotonic()
        response = await api.anonymous.get("/health")
        elapsed = time.monotonic() - started
    finally:
        api.services.ensure_running()
    assert response.status_code == 503 and elapsed < HEALTH_TIMEOUT_S + 2, (response.text, elapsed)
    checks = response.json()["checks"]
    assert response.json()["status"] == "degraded"
    assert not checks["s3"]["ok"] and checks["s3"]["detail"]
    assert checks["kafka"]["ok"] and checks["postgres"]["ok"]
    for secret in (api.services.s3_secret_key, api.services.s3_access_key, TOKEN):
        assert secret not in response.text
    assert (await api.anonymous.get("/health")).status_code == 200  # back once S3 is


async def test_a_postgres_refusing_connections_gives_503_naming_it(api: Api) -> None:
    admin = await asyncpg.connect(api.services.pg_admin_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{api.pg_name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            api.pg_name,
        )
        response = await api.anonymous.get("/health")
    finally:
        await admin.execute(f'ALTER DATABASE "{api.pg_name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert not checks["postgres"]["ok"] and checks["kafka"]["ok"] and checks["s3"]["ok"]

    async def healthy() -> bool:
        return (await api.anonymous.get("/health")).status_code == 200

    await wait_for(healthy, 15)


async def test_every_mutating_endpoint_needs_the_token(api: Api) -> None:
    # The OpenAPI document lists every route of every router create_app includes.
    operations = [(m.upper(), p) for p, ops in openapi_document()["paths"].items() for m in ops if m != "get"]
    assert {p for _, p in operations} >= {"/train", "/adapters/{version}/deploy", "/adapters/rollback"}
    for method, route in operations:
        path = re.sub(r"\{[^}]+\}", "v1.0", route)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await api.anonymous.request(method, path, headers=headers)
            assert "token" in _error(response, 401, "Unauthorized"), (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
    assert (await api.anonymous.get("/training/status")).status_code == 200  # reads stay open
    assert (await api.anonymous.get("/metrics")).status_code == 200


async def test_invalid_requests_get_json_errors(api: Api) -> None:
    message = _error(await api.http.post("/train", json={"min_samples": 0}), 422, "ValidationError")
    assert message.startswith("body.min_samples: ")
    body = (await api.http.post("/train", json={"bogus": 1})).json()
    assert body["details"][0]["loc"] == ["body", "bogus"] and body["details"][0]["type"] == "extra_forbidden"
    _error(
        await api.http.post("/train", content=b"{", headers={"content-type": "application/json"}),
        422,
        "ValidationError",
    )
    assert "query.limit" in _error(await api.http.get("/training/status?limit=0"), 422, "ValidationError")
    assert "path.version" in _error(await api.http.get("/adapters/v1..2"), 422, "ValidationError")
    assert "GET /nope" in _error(await api.http.get("/nope"), 404, "NotFound")
    _error(await api.http.delete("/train"), 405, "MethodNotAllowed")
    assert "not configured" in _error(await api.http.get("/adapters?model=elsewhere"), 404, "NotFound")
    _error(await api.http.post("/train", json={"model": "elsewhere"}), 404, "NotFound")


async def test_manual_train_and_the_status_of_each_job_state(api: Api) -> None:
    db = api.db
    await db.execute("UPDATE jobs SET state = 'failed' WHERE state IN ('queued', 'running')")
    message = _error(await api.http.post("/train", json={}), 409, "Conflict")
    assert "fewer than 1" in message
    await add_samples(db, 1000, 3)
    before = await metric(api.http, "streamengine_windows_closed_total", model="tiny-llama", reason="manual") or 0
    response = await api.http.post("/train")  # no body: the defaults
    assert response.status_code == 202, response.text
    first = response.json()
    assert (first["model"], first["reason"], first["samples"], first["weight"]) == ("tiny-llama", "manual", 3, 3.0)
    after = await metric(api.http, "streamengine_windows_closed_total", model="tiny-llama", reason="manual")
    assert after == before + 1
    status = (await api.http.get("/training/status")).json()
    assert status["open_window"] is None and status["next_tick_at"] and status["jobs_by_state"]["queued"] == 1
    job = status["jobs"][0]
    assert (job["id"], job["state"], job["reason"], job["window_id"]) == (
        first["job_id"],
        "queued",
        "manual",
        first["window_id"],
    )

    claimed = await job_queue.claim(db, "worker-a", 60, 3)
    assert claimed is not None and claimed.id == first["job_id"]
    started = time.time() - 30  # the phase began 30 s ago (the worker's clock)
    progress = {
        "phase": "training",
        "phase_started_at": started,
        "step": 3,
        "total_steps": 12,
        "epoch": 1,
        "loss": 1.25,
        "tokens_per_s": 900.0,
        "eta_s": 42.0,
        "penalty": 0.01,
        "recent_losses": [1.5, 1.25],
    }
    assert await job_queue.heartbeat(db, claimed.id, "worker-a", 60, progress)
    job = (await api.http.get("/training/status")).json()["jobs"][0]
    shown = job["progress"]
    assert datetime.fromisoformat(shown.pop("phase_started_at")).timestamp() == pytest.approx(started)
    assert 30 <= shown.pop("phase_elapsed_s") < 90  # how long it has been in its phase
    assert job["state"] == "running" and job["attempts"] == 1
    assert shown == {name: value for name, value in progress.items() if name != "phase_started_at"}

    await job_queue.finish_unreleased(db, claimed.id, "worker-a", "failed", "out of memory at step 3/12")
    await add_samples(db, 2000, 2)
    second = (await api.http.post("/train", json={"min_samples": 2})).json()
    claimed = await job_queue.claim(db, "worker-a", 60, 3)
    assert claimed is not None and claimed.id == second["job_id"]
    await job_queue.finish_unreleased(db, claimed.id, "worker-a", "rejected", "forgetting 0.3 over bound 0.1")
    status = (await api.http.get("/training/status", params={"limit": 2})).json()
    assert [(j["id"], j["state"], j["error"]) for j in status["jobs"]] == [
        (second["job_id"], "rejected", "forgetting 0.3 over bound 0.1"),
        (first["job_id"], "failed", "out of memory at step 3/12"),
    ]
    assert status["jobs_by_state"]["rejected"] == 1


async def test_adapters_list_info_deploy_and_rollback(api: Api) -> None:
    db = api.db
    for version, parent in (("v1.0", None), ("v1.1", "v1.0"), ("v1.2", "v1.1")):
        await add_adapter(db, version, parent_version=parent)
    await db.execute(
        "INSERT INTO aliases (model, alias, version) VALUES ('tiny-llama', 'production', 'v1.2'),"
        " ('tiny-llama', 'previous', 'v1.1')"
    )
    listed = (await api.anonymous.get("/adapters")).json()
    assert [(a["version"], a["aliases"], a["parent_version"]) for a in listed] == [
        ("v1.2", ["production"], "v1.1"),
        ("v1.1", ["previous"], "v1.0"),
        ("v1.0", [], None),
    ]
    info = (await api.anonymous.get("/adapters/production")).json()
    assert (info["version"], info["size_bytes"], info["metrics"]["eval_loss_after"]) == ("v1.2", 2048, 1.5)
    assert "v9.9" in _error(await api.anonymous.get("/adapters/v9.9"), 404, "NotFound")
    _error(await api.http.post("/adapters/v9.9/deploy"), 404, "NotFound")

    deployed = await api.http.post("/adapters/v1.0/deploy")
    assert deployed.status_code == 200, deployed.text
    assert (deployed.json()["version"], deployed.json()["reason"]) == ("v1.0", "manual")
    status = (await api.http.get("/training/status")).json()
    assert (status["production"], status["previous"]) == ("v1.0", "v1.2")
    rolled = (await api.http.post("/adapters/rollback")).json()
    assert (rolled["version"], rolled["reason"]) == ("v1.2", "rollback")

    k = api.settings.kafka

    async def announced() -> list[Any]:
        records = await read_all(k.bootstrap_servers, k.released_topic, timeout_s=2)
        return records if len(records) >= 2 else []

    records = await wait_for(announced, 20)
    assert [(json.loads(r.value)["version"], json.loads(r.value)["reason"]) for r in records] == [
        ("v1.0", "manual"),
        ("v1.2", "rollback"),
    ]
    assert all(r.key == b"tiny-llama" for r in records)


async def test_metrics_mirror_the_database(api: Api) -> None:
    response = await api.anonymous.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    await add_samples(api.db, 5000, 4)
    samples = await api.db.fetchval("SELECT samples FROM windows WHERE state = 'open'")
    assert await metric(api.anonymous, "streamengine_window_samples", model="tiny-llama") == samples
    queued = await api.db.fetchval("SELECT count(*) FROM jobs WHERE state = 'queued'")
    assert await metric(api.anonymous, "streamengine_jobs", state="queued") == queued


def test_openapi_document_is_committed_and_current() -> None:
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "docs/openapi.json is stale: run `streamengine openapi > docs/openapi.json`"
    )
    schemes = committed["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in committed["paths"].items():
        for method, operation in operations.items():
            assert ("security" in operation) == (method != "get"), (method, path)
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")) and path != "/health":
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


async def test_a_taken_api_port_is_a_config_error_before_anything_starts(make_settings) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(api={"port": taken.getsockname()[1]})
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"api\.port \(STREAMENGINE_API__PORT\): cannot listen"):
            await run_engine(settings)
        assert time.monotonic() - started < 2
