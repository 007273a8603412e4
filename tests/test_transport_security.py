"""TLS and authentication of every network client: Kafka (TLS, mutual TLS, SASL), PostgreSQL, S3.

Against real servers that require them: tansu behind a TLS proxy (tansu 0.6.0 cannot serve TLS itself),
tansu with ``--authentication`` (SCRAM), a PostgreSQL that accepts TLS connections only and SeaweedFS
serving S3 over https, all with certificates of a throwaway CA (tests/tls_tools.py).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streamengine.config.settings import DatabaseSettings, KafkaSettings, Settings, StorageSettings, load_settings
from streamengine.core.masking import settings_secrets
from streamengine.errors import ConfigError, ServiceUnavailable
from streamengine.serving import follow
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream import produce, security
from streamengine.stream.app import build_app
from streamengine.stream.faust_app import broker_credentials
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.producer import start_producer
from streamengine.stream.topics import ensure_topics
from tests.engine_tools import ingest_replica
from tests.kafka_tools import feedback
from tests.polling import wait_for
from tests.tls_tools import SYSTEM_PG_BIN, Pki, ProxiedTansu, TlsPostgres, TlsProxy, TlsSeaweedS3, make_pki

PASSWORD = "scram-test-password-4711"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _broker(pki: Pki, log_dir: Path, **proxy: Any) -> Iterator[TlsProxy]:
    """tansu behind a TLS proxy; yields the proxy (its ``bootstrap`` is what clients are given)."""
    extra = proxy.pop("extra", ())
    tls = TlsProxy(pki, upstream_port=0, **proxy)
    tansu = ProxiedTansu(log_dir, advertised_port=tls.port, extra=extra)
    tls.upstream_port = tansu.port
    tansu.start()
    tls.start()
    try:
        yield tls
    finally:
        tls.stop()
        tansu.stop()


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsProxy]:
    yield from _broker(pki, tmp_path_factory.mktemp("tls-broker"))


@pytest.fixture(scope="module")
def mtls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsProxy]:
    yield from _broker(pki, tmp_path_factory.mktemp("mtls-broker"), require_client_cert=True)


@pytest.fixture(scope="module")
def auth_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsProxy]:
    """tansu requiring SASL (``--authentication``) behind TLS: a SASL_SSL listener like a managed Kafka's."""
    yield from _broker(pki, tmp_path_factory.mktemp("auth-broker"), extra=("--authentication",))


def _tls(make_settings: Callable[..., Settings], broker: TlsProxy, **kafka: Any) -> Settings:
    return make_settings(kafka={"bootstrap_servers": broker.bootstrap, "security_protocol": "SSL", **kafka})


# --- settings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kafka", "named"),
    [
        ({"security_protocol": "SASL_SSL"}, "kafka.sasl_username and kafka.sasl_password"),
        ({"sasl_username": "u", "sasl_password": PASSWORD}, "kafka.security_protocol is PLAINTEXT"),
        ({"ssl_cafile": "{ca}"}, "kafka.security_protocol is PLAINTEXT"),
        ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "kafka.ssl_cafile"),
        ({"security_protocol": "SSL", "ssl_keyfile": "{ca}"}, "without kafka.ssl_certfile"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": PASSWORD,
             "bootstrap_servers": "kafka.example.com:9092"},
            "password in the clear",
        ),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "change-me"}, "placeholder"),
    ],
)  # fmt: skip
def test_kafka_security_settings_refused_with_the_setting_named(pki: Pki, kafka: dict[str, str], named: str) -> None:
    given = {name: value.format(ca=pki.ca) for name, value in kafka.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka=given)
    assert named in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_tls_and_ca_settings_of_database_and_storage_refused_when_they_would_be_ignored(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"database.ca_file is set but the sslmode is unset"):
        load_settings(database={"ca_file": str(pki.ca)})
    with pytest.raises(ConfigError, match=r"database.ca_file \(STREAMENGINE_DATABASE__CA_FILE\): Value error, no file"):
        load_settings(database={"ca_file": "/no/such/ca.pem", "sslmode": "verify-full"})
    with pytest.raises(ConfigError, match=r"storage.ca_file is set but storage.secure is false"):
        load_settings(storage={"ca_file": str(pki.ca)})
    url = "postgresql://u@db.example.com/x?sslmode=verify-full"  # the url's own sslmode counts
    assert load_settings(database={"url": url, "ca_file": str(pki.ca)}).database.sslmode is None


def test_sasl_password_reaches_the_client_options_only(pki: Pki) -> None:
    """Every aiokafka client is built from client_options; the password is a masked secret elsewhere."""
    settings = load_settings(
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "engine",
               "sasl_password": PASSWORD, "ssl_cafile": str(pki.ca)}
    )  # fmt: skip
    options = security.client_options(settings.kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("SCRAM-SHA-512", "engine")
    assert options["sasl_plain_password"] == PASSWORD
    assert options["ssl_context"].verify_mode.name == "CERT_REQUIRED" and options["ssl_context"].check_hostname
    assert PASSWORD in settings_secrets(settings)  # so every log line masks it
    assert PASSWORD not in repr(settings) and PASSWORD not in security.describe(settings.kafka)
    # faust gets the same through broker_credentials, as its aiokafka driver hands them over:
    faust_options = credentials_to_aiokafka_auth(broker_credentials(settings.kafka))
    assert {k: v for k, v in faust_options.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "engine", "sasl_plain_password": PASSWORD,
    }  # fmt: skip
    assert faust_options["ssl_context"].verify_mode.name == "CERT_REQUIRED"
    plain = load_settings()
    assert broker_credentials(plain.kafka) is None
    assert security.client_options(plain.kafka)["security_protocol"] == "PLAINTEXT"


def test_unreadable_certificate_files_are_a_config_error_naming_the_setting(pki: Pki) -> None:
    kafka = KafkaSettings(security_protocol="SSL", ssl_cafile=pki.server_key)  # a key, not a certificate
    with pytest.raises(ConfigError, match=r"kafka.ssl_cafile .* holds no usable CA certificate"):
        security.ssl_context(kafka)
    kafka = KafkaSettings(security_protocol="SSL", ssl_certfile=pki.client_cert, ssl_keyfile=pki.server_key)
    with pytest.raises(ConfigError, match=r"kafka.ssl_certfile .* is not a certificate and its unencrypted private"):
        security.ssl_context(kafka)


# --- Kafka over TLS --------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("consumer", ["aiokafka", "faust"])
async def test_ingest_end_to_end_over_tls(make_settings, tls_broker, pki, tmp_path, consumer) -> None:  # type: ignore[no-untyped-def]
    """Topic admin, the shared producer, the ingest consumer (aiokafka or faust) and a subscriber's consumer
    all reach the broker over TLS only: events become samples in PostgreSQL, a bad record reaches the DLQ."""
    settings = _tls(make_settings, tls_broker, ssl_cafile=str(pki.ca), consumer=consumer)
    k = settings.kafka
    await ensure_topics(k)
    records = produce.prepare([feedback(i) for i in range(20)] + [b"{not json"], k.max_record_bytes, True)
    assert await produce.send(settings, k.feedback_topic, records.records) == 21
    async with ingest_replica(settings, tmp_path) as db:
        await wait_for(lambda: _samples(db, 20), timeout_s=60)
    reader = await follow.open_consumer(k, "tls-test-reader", 100)
    try:
        dlq = await follow.read_to_end(reader, k.dlq_topic, b"", 20, _Never())
    finally:
        await reader.stop()
    assert [r.value for r in dlq or []] == [b"{not json"]


async def _samples(db: Database, expected: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) == expected


class _Never:
    def is_set(self) -> bool:
        return False


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kafka", "reason"),
    [
        ({}, "certificate verify failed: unable to get local issuer certificate"),  # the system's CAs only
        ({"ssl_cafile": "other_ca"}, "certificate verify failed: unable to get local issuer certificate"),
        ({"security_protocol": "PLAINTEXT"}, "(kafka.security_protocol PLAINTEXT)"),
    ],
)
async def test_client_without_the_ca_is_refused_with_a_clear_error(  # type: ignore[no-untyped-def]
    make_settings, tls_broker, pki, kafka, reason
) -> None:
    given = {name: str(getattr(pki, value)) if name == "ssl_cafile" else value for name, value in kafka.items()}
    settings = _tls(make_settings, tls_broker, **given)
    with pytest.raises(ServiceUnavailable) as caught:
        await start_producer(settings.kafka)
    message = str(caught.value)
    assert message.startswith(f"Kafka at {tls_broker.bootstrap} is unreachable")
    assert reason in message
    if settings.kafka.security_protocol == "SSL":
        assert "TLS with the broker failed" in message and "check kafka.ssl_cafile" in message


@pytest.mark.integration
async def test_mutual_tls(make_settings, mtls_broker, pki) -> None:  # type: ignore[no-untyped-def]
    """A broker that requires a client certificate takes the one in kafka.ssl_certfile/ssl_keyfile, and
    refuses a client without one, saying so."""
    settings = _tls(
        make_settings, mtls_broker,
        ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key),
    )  # fmt: skip
    k = settings.kafka
    await ensure_topics(k)
    producer = await start_producer(k)
    try:
        await producer.send_and_wait(k.released_topic, b"over mutual TLS", key=b"tiny-llama")
    finally:
        await producer.stop()
    reader = await follow.open_consumer(k, "mtls-test-reader", 100)
    try:
        records = await follow.read_to_end(reader, k.released_topic, b"tiny-llama", 20, _Never())
    finally:
        await reader.stop()
    assert [r.value for r in records or []] == [b"over mutual TLS"]

    without = _tls(make_settings, mtls_broker, ssl_cafile=str(pki.ca))
    refused = r"TLS with the broker failed: the broker closed the connection after the TLS handshake, as a broker"
    with pytest.raises(ServiceUnavailable, match=refused + r" does that requires a client certificate"):
        await start_producer(without.kafka)


# --- Kafka with SASL -------------------------------------------------------------------------------------
def _sasl_clients(settings: Settings, tmp_path: Path) -> dict[str, Callable[[], Any]]:
    """Each Kafka client of the engine, started through its own code path."""
    k = settings.kafka

    async def ingest_consumer() -> None:
        db = await Database.connect(settings.database)
        try:
            sender = AIOKafkaProducer(**security.client_options(k))  # never started: the consumer fails first
            await build_app(settings, IngestPipeline(settings, db, sender), tmp_path).start()
        finally:
            await db.close()

    return {
        "topic admin": lambda: ensure_topics(k),
        "producer (DLQ, outbox, produce)": lambda: start_producer(k),
        "ingest consumer": ingest_consumer,
        "subscriber consumer": lambda: follow.open_consumer(k, "sasl-test", 100),
    }


@pytest.mark.integration
async def test_every_client_logs_in_with_scram_and_the_broker_refuses_an_unknown_login(  # type: ignore[no-untyped-def]
    make_settings, auth_broker, pki, tmp_path
) -> None:
    """tansu 0.6.0 checks SCRAM logins but cannot be given a user (see docs/operations.md, Security): every
    client runs the SCRAM exchange with the broker over TLS, which answers that it knows no such login."""
    settings = make_settings(
        kafka={"bootstrap_servers": auth_broker.bootstrap, "security_protocol": "SASL_SSL",
               "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "engine", "sasl_password": PASSWORD,
               "ssl_cafile": str(pki.ca)}
    )  # fmt: skip
    for name, start in _sasl_clients(settings, tmp_path).items():
        with pytest.raises(ServiceUnavailable) as caught:
            await start()
        message = str(caught.value)
        assert "the broker refused the SASL login" in message, name
        assert "(kafka.security_protocol SASL_SSL, SCRAM-SHA-512 as user 'engine')" in message, name
        assert PASSWORD not in message, name
    no_login = make_settings(
        kafka={"bootstrap_servers": auth_broker.bootstrap, "security_protocol": "SSL", "ssl_cafile": str(pki.ca)}
    )
    with pytest.raises(ServiceUnavailable, match=r"Unable to bootstrap .*\(kafka.security_protocol SSL\)"):  # no login
        await start_producer(no_login.kafka)


# --- PostgreSQL ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[TlsPostgres]:
    if SYSTEM_PG_BIN is None:
        pytest.skip("no PostgreSQL with TLS support in /usr/lib/postgresql/*/bin")
    root = Path(tempfile.mkdtemp(prefix="streamengine-test-tlspg-"))  # not below pytest's 0700 tmp: runs as nobody
    root.chmod(0o755)
    server = TlsPostgres(root / "data", root / "logs", pki)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
async def test_postgres_over_verified_tls(tls_postgres: TlsPostgres, pki: Pki) -> None:
    plain = tls_postgres.dsn.split("?")[0]  # no sslmode in the url: the settings give it
    db = await Database.connect(DatabaseSettings(url=plain, sslmode="verify-full", ca_file=pki.ca))
    try:
        assert await db.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        assert await db.fetchval("SELECT count(*) FROM schema_migrations") > 0  # migrated over TLS
    finally:
        await db.close()
    with pytest.raises(ServiceUnavailable, match=r"TLS failed: .*certificate verify failed.* database.ca_file"):
        await Database.connect(DatabaseSettings(url=plain, sslmode="verify-full", ca_file=pki.other_ca))
    # The setting wins over the url's sslmode=require; this server refuses connections without TLS.
    with pytest.raises(ServiceUnavailable, match=r"rejects connection .* no encryption"):
        await Database.connect(DatabaseSettings(url=tls_postgres.dsn, sslmode="disable"), migrate=False)


@pytest.mark.integration
async def test_postgres_sslmode_require_refuses_a_server_without_tls(services) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceUnavailable, match=r"rejected SSL upgrade"):
        await Database.connect(DatabaseSettings(url=services.pg_admin_dsn, sslmode="require"), migrate=False)


# --- S3 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_s3(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSeaweedS3]:
    root = tmp_path_factory.mktemp("tls-s3")
    with TlsSeaweedS3(root / "data", root / "logs", pki) as server:
        yield server


@pytest.mark.integration
def test_s3_over_tls_with_the_ca_bundle(
    tls_s3: TlsSeaweedS3, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = {"endpoint": tls_s3.https_endpoint, "access_key": tls_s3.access_key,
               "secret_key": tls_s3.secret_key, "bucket": "tls-bucket", "secure": True}  # fmt: skip
    store = ObjectStore.from_settings(StorageSettings(**storage, ca_file=pki.ca), attempts=1)
    store.ensure_bucket()
    folder = tmp_path / "v1.0"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    hashes = store.upload_folder(folder, "tiny-llama", "v1.0")
    assert hashes == {"adapter_config.json": hashlib.sha256(b'{"r": 8}').hexdigest()}
    dest = store.download_folder("tiny-llama", "v1.0", tmp_path / "down", hashes)
    assert (dest / "adapter_config.json").read_text() == '{"r": 8}'

    for refused in (StorageSettings(**storage), StorageSettings(**storage, ca_file=pki.other_ca)):
        caplog.clear()
        with pytest.raises(ServiceUnavailable, match=f"S3 at {tls_s3.https_endpoint} .*CERTIFICATE_VERIFY_FAILED"
                           r".*storage.ca_file"):  # fmt: skip
            ObjectStore.from_settings(refused, attempts=5).ensure_bucket()
        assert not [r for r in caplog.records if "retry" in r.getMessage()]  # the same answer each time: no retry
