"""Ingest on real Kafka (tansu) and PostgreSQL: validation, DLQ, idempotent samples, exact windows."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamengine.config.settings import Settings
from streamengine.engine import LagObserver
from streamengine.store.db import Database
from streamengine.stream.app import build_app
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.producer import start_producer
from streamengine.stream.topics import ensure_topics
from tests.engine_tools import ingest_replica
from tests.kafka_tools import feedback, produce, read_all
from tests.polling import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["aiokafka", "faust"])
def consumer(request: pytest.FixtureRequest) -> str:
    """Both ingest consumers (kafka.consumer) must behave the same."""
    return str(request.param)


async def count(db: Database, query: str, *args: object) -> int:
    return int(await db.fetchval(query, *args))


async def test_valid_invalid_and_duplicate_records(make_settings, tmp_path, consumer) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(
        window={"max_samples": 1000}, kafka={"max_record_bytes": 10_000, "consumer": consumer}
    )
    await ensure_topics(settings.kafka)
    k = settings.kafka
    valid = [feedback(i) for i in range(50)]
    duplicates = [feedback(i, response="changed") for i in range(10)]  # same ids, other content: dropped
    negative = [feedback(100 + i, kind="thumbs_down") for i in range(5)]
    malformed = [
        b"{not json",
        b"\xff\xfe\x00",
        json.dumps({"event_id": "x1", "model": "tiny-llama"}).encode(),
        feedback(200, kind="sideways"),
        feedback(201, model="another-model"),
        feedback(202, kind="rating", rating=9),
        b"x" * (k.max_record_bytes + 1),
    ]
    await produce(k.bootstrap_servers, k.feedback_topic, valid + malformed + duplicates + negative)
    async with ingest_replica(settings, tmp_path) as db:
        await wait_for(lambda: count(db, "SELECT count(*) FROM samples"), timeout_s=30)
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 55), timeout_s=30)
        dlq = await wait_for(lambda: _records(k.bootstrap_servers, k.dlq_topic, len(malformed)), timeout_s=30)
        window = await db.fetchrow("SELECT * FROM windows WHERE state = 'open'")
        first_response = await db.fetchval("SELECT completion FROM samples WHERE event_id = 'e-3'")
    assert window["samples"] == 50  # thumbs_down stored but not trainable
    assert window["stored"] == 55
    assert first_response == "a3"  # the first copy of a duplicated id wins
    by_class = {}
    for record in dlq:
        headers = {name: value.decode() for name, value in record.headers}
        assert headers["source.topic"] == k.feedback_topic
        assert int(headers["source.offset"]) >= 0
        assert headers["error.message"]
        by_class[headers["error.class"]] = record.value
    assert set(by_class) == {"invalid_json", "invalid_utf8", "schema", "unknown_model", "too_large"}
    assert b"\xff\xfe\x00" in {r.value for r in dlq}  # original bytes untouched


async def _equals(db: Database, query: str, expected: int) -> bool:
    return await count(db, query) == expected


async def _records(bootstrap: str, topic: str, expected: int):  # type: ignore[no-untyped-def]
    records = await read_all(bootstrap, topic)
    return records if len(records) >= expected else None


async def test_two_replicas_close_each_window_exactly_once(make_settings, tmp_path, consumer) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(
        window={"max_samples": 25}, kafka={"batch_max_records": 7, "partitions": 4, "consumer": consumer}
    )
    await ensure_topics(settings.kafka)
    k = settings.kafka
    total = 400
    values = [feedback(i) for i in range(total)]
    async with ingest_replica(settings, tmp_path / "a") as db, ingest_replica(settings, tmp_path / "b"):
        # produce with many keys so both replicas' partitions get records
        await asyncio.gather(
            *(produce(k.bootstrap_servers, k.feedback_topic, values[i::8], key=f"u{i}".encode()) for i in range(8))
        )
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", total), timeout_s=60)
        windows = await db.fetch("SELECT id, state, samples FROM windows ORDER BY id")
        jobs = await db.fetch("SELECT window_id FROM jobs ORDER BY window_id")
    closed = [w for w in windows if w["state"] == "closed"]
    assert len(closed) == total // 25
    assert all(w["samples"] == 25 for w in closed)  # exactly at the threshold, never over
    assert [j["window_id"] for j in jobs] == [w["id"] for w in closed]  # one job per closed window


async def test_both_consumers_commit_what_they_stored_and_report_it(make_settings, tmp_path, consumer) -> None:  # type: ignore[no-untyped-def]
    """Through the one interface the engine uses: the lag observer reads the offsets the replica committed after
    its samples were stored (lag 0 at the end), and the consumer group's offsets on the broker agree."""
    settings: Settings = make_settings(kafka={"partitions": 2, "consumer": consumer, "commit_interval_s": 0.2})
    await ensure_topics(settings.kafka)
    k = settings.kafka
    await _produce_to_partitions(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(30)])
    db = await Database.connect(settings.database)
    producer = await start_producer(k)
    app = build_app(settings, IngestPipeline(settings, db, producer), tmp_path)
    observer = LagObserver(app, k.feedback_topic)
    await app.start()
    try:
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 30), timeout_s=60)
        lags = await wait_for(lambda: _caught_up(observer, partitions=2), timeout_s=30)
        committed = {tp.partition: app.committed(tp) for tp in app.assignment()}
    finally:
        await app.stop()
        await producer.stop()
        await db.close()
    assert lags == {0: 0, 1: 0}
    assert committed == {0: 15, 1: 15}  # the next offset to read, per partition
    assert await _group_offsets(k.bootstrap_servers, k.group_id, k.feedback_topic) == committed


async def _produce_to_partitions(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Half of ``values`` to partition 0, the other half to partition 1."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v, partition=i % 2) for i, v in enumerate(values)])
    finally:
        await producer.stop()


async def _caught_up(observer: LagObserver, partitions: int) -> dict[int, int] | None:
    lags = await observer.observe()
    return lags if len(lags) == partitions and not any(lags.values()) else None


async def _group_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        return {p: await reader.committed(TopicPartition(topic, p)) for p in (0, 1)}
    finally:
        await reader.stop()
