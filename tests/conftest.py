"""Real services for the whole test run: one tansu broker, one SeaweedFS S3 server and PostgreSQL.

``services`` starts them once per session (PostgreSQL: the server on 127.0.0.1:5432 when it answers, else
an embedded one). Tests stay apart by name, not by server: ``pg_dsn`` is a fresh database per test and
``make_settings`` gives each test its own topics, consumer group and bucket.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamengine.config.settings import CONFIG_ENV, ENV_PREFIX, Settings, load_settings
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, drop_database, free_port


@dataclass
class Services:
    """The running services; ``tansu`` and ``s3`` may be stopped, killed and started again by fault tests."""

    tansu: Tansu
    s3: SeaweedS3
    pg_admin_dsn: str
    log_dir: Path
    startup_s: float

    @property
    def kafka_bootstrap(self) -> str:
        return self.tansu.bootstrap

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    @property
    def s3_access_key(self) -> str:
        return self.s3.access_key

    @property
    def s3_secret_key(self) -> str:
        return self.s3.secret_key

    def ensure_running(self) -> None:
        """Start again whatever an earlier (fault) test left stopped."""
        for server in (self.s3, self.tansu):
            if not server.running:
                server.start()


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("services")
    log_dir = root / "logs"
    # An embedded PostgreSQL runs as `nobody` under root: its folder must not sit below pytest's 0700 tmp.
    pg_dir = Path(tempfile.mkdtemp(prefix="streamengine-test-pg-"))
    pg_dir.chmod(0o755)
    began = time.monotonic()
    s3 = SeaweedS3(root / "s3", log_dir)
    tansu = Tansu(log_dir)
    try:
        s3.start()
        tansu.start()
        pg_admin_dsn = Postgres.connect_or_start(pg_dir / "data", log_dir)
        yield Services(tansu, s3, pg_admin_dsn, log_dir, time.monotonic() - began)
    finally:
        tansu.stop()
        s3.stop()
        Postgres.stop_started()
        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.fixture
def pg_dsn(services: Services) -> Iterator[str]:
    """DSN of a fresh, uniquely named database, dropped after the test."""
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(services.pg_admin_dsn, name)
    yield dsn
    drop_database(services.pg_admin_dsn, name)


@pytest.fixture
def make_settings(
    services: Services, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Factory of :class:`Settings` on the test services, with names unique to this test.

    Keyword arguments override whole fields or, given a dict, fields of a nested section:
    ``make_settings(window={"max_samples": 10})``. Calls within one test share topics, group, bucket,
    database and ports, so settings made for two processes of one test see each other.
    """
    for var in [v for v in os.environ if v.startswith(ENV_PREFIX) or v == CONFIG_ENV]:
        monkeypatch.delenv(var)
    services.ensure_running()
    suffix = uuid.uuid4().hex[:10]
    api_port, metrics_port = free_port(), free_port()

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": services.kafka_bootstrap,
                "feedback_topic": f"feedback.events.{suffix}",
                "dlq_topic": f"feedback.events.dlq.{suffix}",
                "released_topic": f"adapter.released.{suffix}",
                "group_id": f"streamengine-ingest-{suffix}",
                "session_timeout_s": 6.0,
                "rebalance_timeout_s": 6.0,
            },
            "database": {"url": pg_dsn},
            "storage": {
                "endpoint": services.s3_endpoint,
                "access_key": services.s3_access_key,
                "secret_key": services.s3_secret_key,
                "bucket": f"se-test-{suffix}",
            },
            "worker": {"work_dir": tmp_path / "work"},
            "serving": {"download_dir": tmp_path / "adapters"},
            "api": {"port": api_port},
            "metrics": {"port": metrics_port},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(fields.get(key), dict):
                fields[key] = {**fields[key], **value}
            else:
                fields[key] = value
        return load_settings(**fields)

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama with a byte tokenizer (built once per session)."""
    from streamengine.local.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
