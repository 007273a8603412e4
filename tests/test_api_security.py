"""The admin API is secure by default (ARCHITECTURE.md, principle 7): nothing mutating is reachable from other
machines without a token, a blank or placeholder secret counts as none, a web page cannot forge a mutating
request, and a flood of reads cannot take ingest's database connections."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
import yaml

from streamengine.api.app import bind_api_socket, openapi_document
from streamengine.api.client import AdminClient
from streamengine.config.settings import PLACEHOLDER_SECRETS, Settings, load_settings
from streamengine.errors import ConfigError, Conflict, NotFound
from streamengine.local.embedded import acreate_database, adrop_database, free_port
from streamengine.store.db import Database
from tests.engine_tools import add_samples, engine_running
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for
from tests.settings_tools import clear_environment, module_settings

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENVS = {
    "STREAMENGINE_API__TOKEN": lambda s: s.api.token,
    "STREAMENGINE_API_TOKEN": lambda s: s.api.token,
    "STREAMENGINE_SIGNING_KEY": lambda s: s.signing_key,
    "STREAMENGINE_SERVING__API_KEY": lambda s: s.serving.api_key,
}
"""The optional secrets, by environment variable, and where the settings keep each."""
S3_KEY_ENVS = ("STREAMENGINE_STORAGE__ACCESS_KEY", "STREAMENGINE_STORAGE__SECRET_KEY")


# --- secrets: blank is unset, placeholders are refused ------------------------------------------------------------
@pytest.mark.parametrize("blank", ["", "  ", "\t\n"])
@pytest.mark.parametrize("env", [*SECRET_ENVS, *S3_KEY_ENVS])
def test_a_blank_secret_counts_as_unset(monkeypatch: pytest.MonkeyPatch, env: str, blank: str) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv(env, blank)
    settings = load_settings()
    if env in SECRET_ENVS:
        assert SECRET_ENVS[env](settings) is None
    else:  # the default keys of a local MinIO (the endpoint is loopback)
        assert settings.storage.access_key.get_secret_value() == settings.storage.secret_key.get_secret_value()
        assert settings.storage.access_key.get_secret_value() == "minioadmin"


@pytest.mark.parametrize("placeholder", ["change-me", "CHANGE-ME", "changeme", "Secret", " password ", "TOKEN"])
@pytest.mark.parametrize("env", [*SECRET_ENVS, *S3_KEY_ENVS])
def test_a_placeholder_secret_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, placeholder: str
) -> None:
    assert placeholder.strip().lower() in PLACEHOLDER_SECRETS
    clear_environment(monkeypatch)
    monkeypatch.setenv(env, placeholder)
    with pytest.raises(ConfigError, match="placeholder") as info:
        load_settings()
    assert f"({env if env != 'STREAMENGINE_API_TOKEN' else 'STREAMENGINE_API__TOKEN'})" in str(info.value)
    assert f"'{placeholder}'" not in str(info.value)  # secrets are never quoted, placeholders neither


def test_minio_default_keys_work_only_with_a_loopback_endpoint() -> None:
    for local in ("127.0.0.1:9000", "localhost:9000", "[::1]:9000", "127.0.0.53:9000"):
        assert load_settings(storage={"endpoint": local}).storage.endpoint == local
    with pytest.raises(ConfigError, match=r"STREAMENGINE_STORAGE__ACCESS_KEY.*minioadmin.*loopback"):
        load_settings(storage={"endpoint": "minio.minio.svc:9000"})
    with pytest.raises(ConfigError, match="minioadmin"):
        load_settings(storage={"endpoint": "10.0.0.5:9000", "access_key": "AKIAREALKEY"})
    real = load_settings(storage={"endpoint": "s3.example.com:443", "access_key": "AK1", "secret_key": "s3cr3t-k3y"})
    assert real.storage.secret_key.get_secret_value() == "s3cr3t-k3y"


# --- no API reachable from other machines without a token ---------------------------------------------------------
def test_an_api_without_a_token_listens_on_loopback_only() -> None:
    bind_api_socket(load_settings(api={"port": free_port()})).close()  # `up` and a laptop: no token needed
    bind_api_socket(load_settings(api={"host": "localhost", "port": free_port()})).close()
    for host in ("0.0.0.0", "", "10.1.2.3"):
        with pytest.raises(ConfigError, match=r"^api\.token \(STREAMENGINE_API__TOKEN\) is not set"):
            bind_api_socket(load_settings(api={"host": host, "port": free_port(), "token": " "}))
    bind_api_socket(load_settings(api={"host": "0.0.0.0", "port": free_port(), "token": "a-real-token-1"})).close()


def _dockerfile_env() -> dict[str, str]:
    """The STREAMENGINE_* variables the Dockerfile's ENV lines set."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = [p for line in text.splitlines() if line.startswith("ENV ") for p in line[4:].split()]
    return dict(p.split("=", 1) for p in pairs if p.startswith("STREAMENGINE_"))


def _run_engine(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    dead = free_port()  # nothing listens: the code as it was got past the API and failed on PostgreSQL (exit 3)
    clean.update(
        PYTHONWARNINGS="ignore",
        STREAMENGINE_DATABASE__URL=f"postgresql://postgres@127.0.0.1:{dead}/streamengine",
        STREAMENGINE_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{dead}",
        STREAMENGINE_API__PORT=str(free_port()),
        **env,
    )
    program = [sys.executable, "-m", "streamengine.cli.main", "run"]
    return subprocess.run(program, env=clean, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("token", "says"),
    [(None, "is not set"), ("", "is not set"), ("CHANGE-ME", "placeholder"), ("change-me", "placeholder")],
)
def test_run_with_the_dockerfile_settings_refuses_to_start_without_a_real_token(token: str | None, says: str) -> None:
    env = _dockerfile_env()
    assert env["STREAMENGINE_API__HOST"] == "0.0.0.0"
    if token is not None:
        env["STREAMENGINE_API__TOKEN"] = token
    result = _run_engine(env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("streamengine: error: ") and "api.token (STREAMENGINE_API__TOKEN)" in lines[0]
    assert says in lines[0]


def test_compose_has_no_default_token() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    for name in ("engine", "worker"):
        token = compose["services"][name]["environment"]["STREAMENGINE_API__TOKEN"]
        assert re.fullmatch(r"\$\{STREAMENGINE_API__TOKEN:\?[^}]+\}", token), token  # required, no fallback
    if shutil.which("docker-compose") is None:
        return  # CI installs it (apt-get install docker-compose)
    env = {k: v for k, v in os.environ.items() if k != "STREAMENGINE_API__TOKEN"}
    for unset in (env, {**env, "STREAMENGINE_API__TOKEN": ""}):
        args = ["docker-compose", "-f", "docker-compose.yaml", "config", "-q"]
        result = subprocess.run(args, cwd=ROOT, env=unset, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "set STREAMENGINE_API__TOKEN" in result.stderr, result.stderr


def test_kubernetes_secret_ships_no_value_and_nothing_starts_until_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    k8s = ROOT / "deploy" / "k8s"
    assert "secret.yaml" not in yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
    shipped = yaml.safe_load((k8s / "secret.yaml").read_text())["stringData"]
    assert shipped and set(shipped.values()) == {""}, shipped  # a template: `kubectl create secret` (see its header)
    assert "kubectl create secret generic streamengine" in (k8s / "secret.yaml").read_text()
    clear_environment(monkeypatch)
    for name, value in {**yaml.safe_load((k8s / "configmap.yaml").read_text())["data"], **shipped}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "STREAMENGINE_DATABASE__URL" in str(info.value) and "STREAMENGINE_STORAGE__ACCESS_KEY" in str(info.value)
    monkeypatch.setenv("STREAMENGINE_DATABASE__URL", "postgresql://se:pw@db:5432/se")
    monkeypatch.setenv("STREAMENGINE_STORAGE__ACCESS_KEY", "AK-of-the-cluster")
    monkeypatch.setenv("STREAMENGINE_STORAGE__SECRET_KEY", "sk-of-the-cluster")
    settings = load_settings()
    assert settings.api.host == "0.0.0.0" and settings.api.token is None and settings.signing_key is None
    with pytest.raises(ConfigError, match=r"api\.token \(STREAMENGINE_API__TOKEN\) is not set"):
        bind_api_socket(settings.model_copy(update={"api": settings.api.model_copy(update={"port": free_port()})}))


# --- a running engine without a token, on loopback (as `streamengine up` runs it) -----------------------------------
@dataclass
class Engine:
    settings: Settings
    http: httpx.AsyncClient
    db: Database
    name: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(services, tmp_path_factory) -> AsyncIterator[Engine]:  # type: ignore[no-untyped-def]
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = await acreate_database(services.pg_admin_dsn, name)
    with pytest.MonkeyPatch.context() as patch:
        clear_environment(patch)
        settings = module_settings(services, dsn, tmp_path_factory.mktemp("api-security"))
        assert settings.api.token is None and settings.api.host == "127.0.0.1"
        async with engine_running(settings) as http:
            db = await Database.connect(settings.database, migrate=False)
            try:
                yield Engine(settings, http, db, name)
            finally:
                await db.close()
    await adrop_database(services.pg_admin_dsn, name)


FORGED = [
    {},  # no body, no content type: a fetch() with mode no-cors, an <img>-like POST
    {"content": b"user_id=u1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    {"content": b'{"user_id": "u1"}', "headers": {"Content-Type": "text/plain"}},
    {"content": b"--b\r\n\r\n--b--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
]
"""What a web page on any origin can send without a CORS preflight: no content type, a form, or text/plain."""
EVIL = {"Origin": "http://evil.example"}


@pytest.mark.integration
async def test_no_mutating_route_accepts_what_a_web_page_can_send(engine: Engine) -> None:
    await add_samples(engine.db, 0, 5)  # what /train would close, were the request let through
    operations = [(m.upper(), p) for p, ops in openapi_document()["paths"].items() for m in ops if m != "get"]
    assert len(operations) >= 7
    for method, route in operations:
        path = re.sub(r"\{[^}]+\}", "v1.0", route)
        for forged in FORGED:
            headers = {**EVIL, **forged.get("headers", {})}
            response = await engine.http.request(method, path, content=forged.get("content"), headers=headers)
            assert response.status_code == 415, (method, path, headers, response.text)
            assert response.json()["error"] == "UnsupportedMediaType" and "application/json" in response.text
            assert "access-control-allow-origin" not in response.headers
    assert await engine.db.fetchval("SELECT count(*) FROM jobs") == 0
    assert await engine.db.fetchval("SELECT samples FROM windows WHERE state = 'open'") == 5
    # What the CLI sends gets through: a JSON content type (a page cannot send it cross-origin unasked).
    train = await engine.http.post("/train", json={"min_samples": 1})
    assert train.status_code == 202, train.text


@pytest.mark.integration
async def test_cross_origin_requests_get_no_cors_headers(engine: Engine) -> None:
    for path in ("/train", "/users/forget", "/adapters/rollback", "/training/status"):
        preflight = await engine.http.options(
            path,
            headers={
                **EVIL,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert not any(h.startswith("access-control-") for h in preflight.headers), (path, preflight.headers)
    for path in ("/training/status", "/health", "/adapters", "/metrics"):
        read = await engine.http.get(path, headers=EVIL)
        assert read.status_code in (200, 503) and "access-control-allow-origin" not in read.headers, path


@pytest.mark.integration
async def test_the_cli_client_says_json_on_every_mutating_call(engine: Engine) -> None:
    client = AdminClient(engine.settings)
    try:
        with pytest.raises(Conflict):  # reached the route: no previous version to roll back to
            await asyncio.to_thread(client.post, "/adapters/rollback")
        with pytest.raises(NotFound):
            await asyncio.to_thread(client.request, "DELETE", "/adapters/v9.9")
        gc = await asyncio.to_thread(client.post, "/adapters/gc", keep=0, dry_run=True)
        assert gc["dry_run"] is True
    finally:
        client.close()


# --- reads have their own pool ------------------------------------------------------------------------------------
async def _waiting_on_lock(db: Database, name: str) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
    return int(await db.fetchval(query, name))


@pytest.mark.integration
async def test_a_flood_of_reads_leaves_ingest_its_connections(engine: Engine) -> None:
    """110 reads at once, each stuck on a locked table, while ingest stores an event within a bound: the reads
    wait in their own pool (database.api_pool_size), ingest's pool (database.pool_max) stays theirs."""
    settings, kafka = engine.settings, engine.settings.kafka
    assert settings.database.api_pool_size < settings.database.pool_max
    locker = await asyncpg.connect(settings.database.url.get_secret_value())
    lock = locker.transaction()
    await lock.start()
    await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")  # /training/status and /metrics read it
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=settings.api.base_url(), limits=limits, timeout=120) as reader:
        paths = ["/training/status"] * 50 + ["/health"] * 50 + ["/metrics"] * 10
        flood = [asyncio.create_task(reader.get(path)) for path in paths]
        try:
            await wait_for(lambda: _waiting_on_lock(engine.db, engine.name), 15)  # the reads hold connections
            event_id = f"flood-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            await produce(kafka.bootstrap_servers, kafka.feedback_topic, [feedback(0, event_id=event_id)])
            query = "SELECT count(*) FROM samples WHERE event_id = $1"
            await wait_for(
                lambda: engine.db.fetchval(query, event_id),
                10,
                describe=lambda: _waiting_on_lock(engine.db, engine.name),  # backends stuck on the lock
            )
            assert time.monotonic() - started < 10
        finally:
            await lock.rollback()
            await locker.close()
            responses = await asyncio.gather(*flood)
    by_path: dict[str, set[int]] = {}
    for path, response in zip(paths, responses, strict=True):
        by_path.setdefault(path, set()).add(response.status_code)
    # /health's PostgreSQL probe waited on the read pool past its 3 s: degraded, as it should say.
    assert by_path["/training/status"] == {200} and by_path["/metrics"] == {200}, by_path
    assert by_path["/health"] <= {200, 503}, by_path
    assert (await engine.http.get("/health")).status_code == 200
