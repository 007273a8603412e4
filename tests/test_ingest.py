"""Ingest on real Kafka (tansu) and PostgreSQL: validation, DLQ, idempotent samples, exact windows."""

from __future__ import annotations

import asyncio
import json

import pytest

from streamengine.config.settings import Settings
from streamengine.store.db import Database
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
