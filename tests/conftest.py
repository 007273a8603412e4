"""Real services for the whole test run: one tansu broker, one SeaweedFS S3 server and PostgreSQL.

``services`` starts them once per session (PostgreSQL: the server on 127.0.0.1:5432 when it answers, else
an embedded one). Tests stay apart by name, not by server: ``pg_dsn`` is a fresh database per test and
``make_settings`` gives each test its own topics, consumer group and bucket.

Every test that uses these services carries the ``integration`` marker, so ``-m "not integration"`` runs
without them; collection fails for a test that uses ``services`` (directly or through a fixture built on
it) without the marker. Tests that start the services themselves (``streamengine up``, a private S3
server) are marked by hand.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamengine.config.settings import Settings
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, drop_database
from tests.settings_tools import clear_environment, settings_factory


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fail collection when a test uses the real services without the ``integration`` marker."""
    unmarked = [
        item.nodeid
        for item in items
        if "services" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the real services (the `services` fixture) but are not marked "
            "`integration`:\n  " + "\n  ".join(unmarked)
        )


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
    """Factory of :class:`Settings` on the test services, with names unique to this test (see
    :func:`tests.settings_tools.settings_factory`); no STREAMENGINE_* variable of the caller's counts."""
    clear_environment(monkeypatch)
    services.ensure_running()
    return settings_factory(services, pg_dsn, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama with a byte tokenizer (built once per session)."""
    from streamengine.local.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
