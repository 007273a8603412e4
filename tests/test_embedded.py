"""The embedded services really serve: Kafka round trips, S3 objects that survive restarts, databases."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamengine.config.settings import Settings
from streamengine.errors import ServiceUnavailable
from streamengine.local.embedded import Postgres, SeaweedS3, Tansu, create_database, drop_database, free_port

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, topic: str, count: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(topic, value=f"record-{i}".encode(), key=str(i).encode())
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        values: list[bytes] = []
        while len(values) < count:
            batches = await consumer.getmany(partition, timeout_ms=5000, max_records=count)
            assert batches, f"only {len(values)} of {count} records came back"
            values += [record.value for record in batches[partition] if record.value is not None]
        return values
    finally:
        await consumer.stop()


async def test_tansu_round_trip(services) -> None:
    topic = f"roundtrip.{uuid.uuid4().hex[:8]}"
    await _produce(services.kafka_bootstrap, topic, 20)
    assert await _consume(services.kafka_bootstrap, topic, 20) == [f"record-{i}".encode() for i in range(20)]


async def test_tansu_on_s3_keeps_records_across_kill(services, tmp_path: Path) -> None:
    bucket = f"tansu-{uuid.uuid4().hex[:8]}"
    with Tansu(services.log_dir, s3=services.s3, bucket=bucket) as broker:
        await _produce(broker.bootstrap, "durable", 5)
        broker.kill()
        broker.start()
        assert await _consume(broker.bootstrap, "durable", 5) == [f"record-{i}".encode() for i in range(5)]


def test_s3_objects_survive_stop_and_kill(services) -> None:
    bucket = f"se-test-{uuid.uuid4().hex[:8]}"
    services.s3.ensure_bucket(bucket)
    services.s3.client().put_object(bucket, "a/b.bin", io.BytesIO(b"payload"), 7)
    port = services.s3.port
    services.s3.stop()
    services.s3.start()
    assert services.s3.client().get_object(bucket, "a/b.bin").read() == b"payload"
    services.s3.kill()
    services.s3.start()
    assert services.s3.port == port
    assert services.s3.client().get_object(bucket, "a/b.bin").read() == b"payload"


def test_s3_rejects_wrong_keys(services) -> None:
    from minio import Minio
    from minio.error import S3Error

    with pytest.raises(S3Error):
        Minio(services.s3_endpoint, access_key="nobody", secret_key="wrong-secret", secure=False).list_buckets()


async def test_pg_dsn_is_a_fresh_usable_database(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO t VALUES (1, 'x')")
        assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == "x"
        assert (await conn.fetchval("SELECT current_database()")).startswith("se_test_")
    finally:
        await conn.close()


async def test_drop_database_disconnects_clients(services) -> None:
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(create_database(services.pg_admin_dsn, name))
    drop_database(services.pg_admin_dsn, name)
    assert conn.is_closed() or not await _alive(conn)
    admin = await asyncpg.connect(services.pg_admin_dsn)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await admin.close()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    finally:
        await conn.close()
    return True


def test_port_in_use_and_missing_binary_are_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServiceUnavailable, match=rf"tansu at 127\.0\.0\.1:{port} .*port already in use"):
            Tansu(tmp_path, port=port).start()
    with pytest.raises(ServiceUnavailable, match=r"seaweedfs .*missing"):
        SeaweedS3(tmp_path / "s3", tmp_path, binary=tmp_path / "no-weed").start()


def test_make_settings_points_at_the_services(make_settings, services, pg_dsn: str) -> None:
    settings: Settings = make_settings(window={"max_samples": 10}, kafka={"partitions": 2})
    again: Settings = make_settings()
    assert settings.kafka.bootstrap_servers == services.kafka_bootstrap
    assert settings.kafka.partitions == 2 and settings.kafka.session_timeout_s == 6
    assert settings.window.max_samples == 10
    assert settings.database.url.get_secret_value() == pg_dsn
    assert settings.storage.endpoint == services.s3_endpoint
    assert settings.kafka.feedback_topic == again.kafka.feedback_topic != "feedback.events"
    assert settings.storage.bucket == again.storage.bucket


def test_embedded_postgres_starts_when_no_server_answers(tmp_path: Path) -> None:
    # Not under pytest's 0700 tmp: as root the server runs as `nobody`, which must reach its folder.
    root = Path(tempfile.mkdtemp(prefix="streamengine-test-pg-"))
    root.chmod(0o755)
    try:
        unused = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        dsn = Postgres.connect_or_start(root / "data", tmp_path, dsn=unused)
        assert dsn != unused and (tmp_path / "postgresql.log").is_file()
        db = create_database(dsn, "se_embedded")
        assert asyncio.run(_fetch(db, "SELECT current_database()")) == "se_embedded"
        drop_database(dsn, "se_embedded")
    finally:
        Postgres.stop_started()
        shutil.rmtree(root, ignore_errors=True)


async def _fetch(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
