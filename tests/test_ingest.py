"""Ingest on real Kafka (tansu) and PostgreSQL: validation, DLQ, idempotent samples, exact windows."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamengine import metrics
from streamengine.config.settings import DatabaseSettings, Settings
from streamengine.contract.events import decode_fields
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.engine import LagObserver
from streamengine.errors import data_rejection, is_transient
from streamengine.local.embedded import adrop_database, database_dsn
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.store.windows import SampleAt
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
    valid = [feedback(i) for i in range(49)] + [feedback(49, prompt=[{"role": "user", "content": "hi"}] * 256)]
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
        feedback(203, prompt=[{"role": "user", "content": "hi"}] * 257),  # over samples.max_messages (256)
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
    assert set(by_class) == {"invalid_json", "invalid_utf8", "schema", "unknown_model", "too_large", "too_long"}
    assert b"\xff\xfe\x00" in {r.value for r in dlq}  # original bytes untouched
    too_long = next(r for r in dlq if dict(r.headers)["error.class"] == b"too_long")
    assert dict(too_long.headers)["error.message"] == b"prompt has 257 messages, over samples.max_messages (256)"


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
        all_windows = await db.fetch("SELECT id, state, samples FROM windows ORDER BY id")
        jobs = await db.fetch("SELECT window_id FROM jobs ORDER BY window_id")
    closed = [w for w in all_windows if w["state"] == "closed"]
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


async def test_a_partition_never_committed_is_read_from_offset_0_and_a_committed_one_from_its_commit(  # type: ignore[no-untyped-def]
    make_settings, tmp_path
) -> None:
    """The ingest replica starts a partition its group never committed at offset 0 (not where the broker says
    the log starts: tansu once said 1 and the first record was lost), and a committed one at its commit."""
    settings: Settings = make_settings(kafka={"partitions": 2})
    await ensure_topics(settings.kafka)
    k = settings.kafka
    await _produce_to_partitions(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(8)])
    done = TopicPartition(k.feedback_topic, 1)
    committer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, group_id=k.group_id, enable_auto_commit=False)
    committer.assign([done])
    await committer.start()
    try:
        await committer.commit({done: 3})  # partition 1: offsets 0-2 stored before
    finally:
        await committer.stop()
    async with ingest_replica(settings, tmp_path) as db:
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 5), timeout_s=60)
        await asyncio.sleep(1.0)  # nothing more comes
        rows = await db.fetch("SELECT source_partition, source_offset FROM samples ORDER BY 1, 2")
    assert [(r["source_partition"], r["source_offset"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3)]


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


async def test_batches_are_bounded_in_bytes_whatever_the_records_size(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Large records: a batch holds at most kafka.batch_max_bytes (what is left of a fetch waits for the next
    batch), not kafka.batch_max_records, and is written as soon as it is full (not after batch_max_wait_s);
    every record is stored once."""
    limit = 1024 * 1024
    settings: Settings = make_settings(
        kafka={"partitions": 3, "batch_max_bytes": limit, "batch_max_wait_s": 10.0},
        window={"max_samples": 1000},
    )
    await ensure_topics(settings.kafka)
    k = settings.kafka
    big = [feedback(i, response="r" * 60_000, padding="p" * 90_000) for i in range(40)]  # 40 x 150 KB: 6 MB
    small = [feedback(100 + i) for i in range(60)]
    await asyncio.gather(
        *(produce(k.bootstrap_servers, k.feedback_topic, (big + small)[i::6], key=f"k{i}".encode()) for i in range(6))
    )
    before = _histogram(metrics.INGEST_BATCH_BYTES)
    async with ingest_replica(settings, tmp_path) as db:
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 100), timeout_s=60)
        stored = await count(db, "SELECT count(DISTINCT event_id) FROM samples")
    after = _histogram(metrics.INGEST_BATCH_BYTES)
    batches, total = after["count"] - before["count"], after["sum"] - before["sum"]
    assert stored == 100
    assert total >= sum(len(v) for v in big + small)  # every record counted once at least
    assert after[limit] - before[limit] == batches  # every batch at most 1 MiB ...
    assert batches >= total / limit  # ... so several batches, where the record bound (1000) allows one


async def test_a_batch_that_may_fill_the_window_is_written_without_waiting_for_the_timer(  # type: ignore[no-untyped-def]
    make_settings, tmp_path
) -> None:
    """Once ingest knows how full the open window is (after its first write), a batch holding as many records as
    the window still takes is written at once: the window closes as its last event arrives, not a batch timer
    (30 s here) later."""
    settings: Settings = make_settings(
        kafka={"batch_max_wait_s": 30.0, "batch_max_records": 3}, window={"max_samples": 4}
    )
    await ensure_topics(settings.kafka)
    k = settings.kafka
    async with ingest_replica(settings, tmp_path) as db:
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(3)], key=b"k")
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 3), timeout_s=25)  # a full batch (3)
        assert await count(db, "SELECT count(*) FROM windows WHERE state = 'closed'") == 0
        await produce(k.bootstrap_servers, k.feedback_topic, [feedback(3)], key=b"k")
        # one record, where the batch bound is 3 and the timer 30 s: only the window's room ends the batch
        await wait_for(lambda: _equals(db, "SELECT count(*) FROM windows WHERE state = 'closed'", 1), timeout_s=20)
        assert await count(db, "SELECT count(*) FROM jobs") == 1


def _histogram(histogram: Any) -> dict[Any, float]:
    """A histogram's count, sum and cumulative count per upper bound."""
    values: dict[Any, float] = {}
    for sample in histogram.collect()[0].samples:
        if sample.name.endswith("_count"):
            values["count"] = sample.value
        elif sample.name.endswith("_sum"):
            values["sum"] = sample.value
        elif sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
            values[int(float(sample.labels["le"]))] = sample.value
    return values


async def test_a_record_postgresql_refuses_goes_to_the_dlq_and_the_rest_is_stored(  # type: ignore[no-untyped-def]
    make_settings, services, tmp_path
) -> None:
    """A LATIN1 database cannot hold Japanese text, which the decoder rightly accepts: the write of a batch that
    holds some fails for good. Those records (only them) go to the DLQ naming the rejection, the others are
    stored with exact windows, and the consumer goes on with the next records."""
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.pg_admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    finally:
        await admin.close()
    try:
        settings: Settings = make_settings(
            database={"url": database_dsn(services.pg_admin_dsn, name)},
            window={"max_samples": 4},
            kafka={"batch_max_wait_s": 1.0},
        )
        await ensure_topics(settings.kafka)
        k = settings.kafka
        refused = {3, 11, 12}
        values = [feedback(i, response="\u65e5\u672c" if i in refused else "caf\u00e9") for i in range(20)]
        await produce(k.bootstrap_servers, k.feedback_topic, values)
        async with ingest_replica(settings, tmp_path) as db:
            await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 17), timeout_s=60)
            dlq = await wait_for(lambda: _records(k.bootstrap_servers, k.dlq_topic, 3), timeout_s=30)
            await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(20, 25)])
            await wait_for(lambda: _equals(db, "SELECT count(*) FROM samples", 22), timeout_s=60)
            all_windows = await db.fetch("SELECT state, samples, stored FROM windows ORDER BY id")
            kept = await db.fetchval("SELECT completion FROM samples WHERE event_id = 'e-0'")
    finally:
        await adrop_database(services.pg_admin_dsn, name)
    assert sorted(int(dict(r.headers)["source.offset"]) for r in dlq) == sorted(refused)
    for record in dlq:
        headers = {key: value.decode() for key, value in record.headers}
        assert headers["error.class"] == "database_untranslatable_character"
        assert "22P05" in headers["error.message"]
        assert record.value == values[int(headers["source.offset"])]
    assert kept == "caf\u00e9"
    assert [(w["state"], w["samples"]) for w in all_windows] == [("closed", 4)] * 5 + [("open", 2)]
    assert sum(w["stored"] for w in all_windows) == 22


async def test_postgresql_errors_are_classified_by_what_a_retry_can_change(pg_dsn: str) -> None:
    """Real errors from PostgreSQL: what the values or the statement cause is permanent (the values' fault: a
    DLQ reason), what the moment causes is retried."""
    conn = await asyncpg.connect(pg_dsn)
    other = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, s varchar(3) CHECK (s <> 'bad'))")
        caught = {}
        for name, statement in {
            "too_long": "INSERT INTO t VALUES (1, 'abcd')",
            "check": "INSERT INTO t VALUES (1, 'bad')",
            "not_a_number": "SELECT 'x'::int",
            "no_table": "SELECT * FROM missing",
        }.items():
            with pytest.raises(asyncpg.PostgresError) as error:
                await conn.execute(statement)
            caught[name] = error.value
        await conn.execute("INSERT INTO t VALUES (1, 'a')")
        with pytest.raises(asyncpg.PostgresError) as error:  # a row another transaction committed first
            await other.execute("INSERT INTO t VALUES (1, 'b')")
        caught["race"] = error.value
        await other.execute("SET statement_timeout = 10")
        with pytest.raises(asyncpg.PostgresError) as error:
            await other.execute("SELECT pg_sleep(1)")
        caught["timeout"] = error.value
    finally:
        await conn.close()
        await other.close()
    with pytest.raises(asyncpg.PostgresError) as error:  # the server ends the session (a restart, a failover)
        killed = await asyncpg.connect(pg_dsn)
        try:
            await killed.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        finally:
            await killed.close()
    caught["shutdown"] = error.value
    assert {name: (is_transient(exc), data_rejection(exc)) for name, exc in caught.items()} == {
        "too_long": (False, "database_string_data_right_truncation"),
        "check": (False, "database_check_violation"),
        "not_a_number": (False, "database_invalid_text_representation"),
        "no_table": (False, None),
        "race": (True, None),
        "timeout": (True, None),
        "shutdown": (True, None),
    }


async def test_a_batch_written_without_looking_first_still_drops_what_is_stored(pg_dsn: str) -> None:
    """``look_first=False`` (ingest's mode while no duplicates come): a batch holding samples stored before is
    refused by the COPY and written again looking first, with the same outcome as looking first at once."""
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    policy, sample_policy = WindowPolicy(max_samples=4), SamplePolicy(kind_weights={"thumbs_up": 1.0})

    def rows(ids: range, answer: str) -> list[SampleAt]:
        events = [decode_fields(feedback(i, response=answer), 10_000) for i in ids]
        return [(to_sample(event, sample_policy), 0, i) for i, event in zip(ids, events, strict=True)]

    try:
        first = await windows.write_batch(db, rows(range(5), "first"), policy, look_first=False)
        again = await windows.write_batch(db, rows(range(3, 11), "second"), policy, look_first=False)
        stored = {r["event_id"]: r["completion"] for r in await db.fetch("SELECT event_id, completion FROM samples")}
        counts = await db.fetch("SELECT state, samples FROM windows ORDER BY id")
    finally:
        await db.close()
    assert (first.inserted, first.duplicates, len(first.closed)) == (5, 0, 1)
    assert (again.inserted, again.duplicates, len(again.closed)) == (6, 2, 1)
    assert stored["e-4"] == "first" and stored["e-10"] == "second" and len(stored) == 11
    assert [(w["state"], w["samples"]) for w in counts] == [("closed", 4), ("closed", 4), ("open", 3)]
