"""Hostile records through the real consumer, broker and PostgreSQL.

A few thousand records of every class of ``bench.fuzz_decoder.Corpus`` (hostile, valid, duplicates with
other content) through `streamengine run`; the length limits in both modes; one user flooding a window,
through ingest and the job's data preparation.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from bench.fuzz_decoder import ACCEPTED, Case, Corpus
from streamengine.config.settings import Settings
from streamengine.jobs import dataset
from streamengine.store.db import Database
from streamengine.stream.ingest import DLQ_PREVIEW_BYTES
from streamengine.stream.topics import ensure_topics
from tests import process_tools
from tests.engine_tools import health_ok, ingest_replica, metric
from tests.kafka_tools import DLQ_REASONS, feedback, produce, read_all
from tests.polling import wait_for

pytestmark = pytest.mark.integration


async def produce_tracked(bootstrap: str, topic: str, values: list[bytes | None]) -> list[int]:
    """Produce in order to one partition; the offset of each record. Allows records of up to 8 MiB."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=b"fuzz", partition=0) for v in values]
        return [metadata.offset for metadata in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def completion_of(value: bytes) -> str:
    event = json.loads(value)
    return str(event["correction"] if event["kind"] == "correction" else event["response"])


@pytest.mark.slow
async def test_hostile_stream_through_streamengine_run(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    limits = {"max_prompt_chars": 4_000, "max_completion_chars": 4_000}
    settings: Settings = make_settings(
        kafka={"max_record_bytes": 65_536, "partitions": 1, "batch_max_records": 500},
        samples=limits,
        window={"max_samples": 1_000_000},
    )
    k = settings.kafka
    await ensure_topics(k)
    corpus = Corpus(seed=11, model=settings.model.name, max_record_bytes=k.max_record_bytes, **limits)
    warmup = [corpus.make("valid") for _ in range(200)]
    classes = [name for name in corpus.classes if name != "mutated"]
    # Over the engine producer's 1 MiB max request: the DLQ keeps a preview instead of retrying forever.
    giant = json.dumps({**json.loads(warmup[0].value or b""), "pad": "g" * 3_000_000}).encode()
    rounds = []  # two rounds of the same mix: memory must not keep growing with the records
    for _ in range(2):
        cases = [corpus.make(classes[i % len(classes)]) for i in range(1500)]
        giants = [Case("giant", giant, "reject"), Case("giant", giant, "reject")]
        rounds.append([*cases[:500], giants[0], *cases[500:1000], giants[1], *cases[1000:]])
    cases = [case for batch in rounds for case in batch]

    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    log = tmp_path / "run.log"
    engine = process_tools.start(["run"], config, log)
    db = await Database.connect(settings.database)
    try:
        await wait_for(lambda: health_ok(settings.api.base_url()), timeout_s=90)
        await produce_tracked(k.bootstrap_servers, k.feedback_topic, [c.value for c in warmup])
        await wait_for(lambda: _count(db, len(warmup)), timeout_s=60)
        memory = [memory_kib(engine.pid)]
        offsets: list[int] = []
        async with httpx.AsyncClient(base_url=settings.api.base_url()) as http:
            for batch in rounds:
                offsets += await produce_tracked(k.bootstrap_servers, k.feedback_topic, [c.value for c in batch])

                async def caught_up(n: int = len(warmup) + len(offsets)) -> bool:  # processed, end offset committed
                    consumed = await metric(http, "streamengine_events_consumed_total") or 0
                    lag = await metric(http, "streamengine_consumer_lag_records", topic=k.feedback_topic, partition="0")
                    return consumed >= n and lag == 0

                await wait_for(caught_up, timeout_s=120)
                memory.append(memory_kib(engine.pid))
            deduplicated = await metric(http, "streamengine_events_deduplicated_total")
            rejected = {reason: await metric(http, "streamengine_events_rejected_total", reason=reason) or 0.0
                        for reason in DLQ_REASONS | {"internal_error"}}  # fmt: skip
        hostile = {offset: case for offset, case in zip(offsets, cases, strict=True) if case.expect == "reject"}
        dlq = await wait_for(lambda: _at_least(k.bootstrap_servers, k.dlq_topic, len(hostile)), timeout_s=60)
        rows = {r["event_id"]: r["completion"] for r in await db.fetch("SELECT event_id, completion FROM samples")}
    finally:
        process_tools.stop(engine)
        await db.close()

    # every hostile record is in the DLQ once, with a reason; the original bytes, or a preview of a giant
    by_offset = {}
    for record in dlq:
        headers = {name: value.decode() for name, value in record.headers}
        by_offset[int(headers["source.offset"])] = (record, headers)
    assert len(dlq) == len(by_offset) == len(hostile)
    assert set(by_offset) == set(hostile)
    for offset, (record, headers) in by_offset.items():
        assert headers["error.class"] in DLQ_REASONS and headers["error.message"], headers
        if hostile[offset].cls == "giant":
            assert headers["error.class"] == "too_large"
            assert headers["error.message"].startswith(f"DLQ value cut to its first {DLQ_PREVIEW_BYTES} of")
            assert record.value == giant[:DLQ_PREVIEW_BYTES]
        else:
            assert record.value == hostile[offset].value
    assert rejected["internal_error"] == 0
    assert sum(rejected.values()) == len(hostile)

    # every distinct valid event stored exactly once, the first copy of an id winning
    first: dict[str, str] = {}
    for case in [*warmup, *cases]:
        if case.expect == "valid":
            assert case.event_id is not None and case.value is not None
            first.setdefault(case.event_id, completion_of(case.value))
    duplicates = [c for c in cases if c.expect == "duplicate"]
    assert rows == first
    assert deduplicated == len(duplicates) > 100

    assert offsets == list(range(len(warmup), len(warmup) + len(cases)))

    mib = [{name: kib / 1024 for name, kib in m.items()} for m in memory]
    print(
        f"\nfuzz through `streamengine run`: {len(cases)} records ({len(hostile)} hostile, "
        f"{sum(1 for c in cases if c.cls in ACCEPTED)} accepted classes, {len(duplicates)} duplicates); "
        "RSS / peak RSS in MiB after warm-up, round 1, round 2: "
        + ", ".join(f"{m['VmRSS']:.0f} / {m['VmHWM']:.0f}" for m in mib)
    )
    assert mib[2]["VmHWM"] - mib[0]["VmRSS"] < 400, mib  # bounded by the batch, not by the stream
    assert mib[2]["VmHWM"] - mib[1]["VmHWM"] < 48, mib  # the second round of the same mix adds ~nothing


async def _count(db: Database, expected: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) >= expected


async def _at_least(bootstrap: str, topic: str, expected: int):  # type: ignore[no-untyped-def]
    records = await read_all(bootstrap, topic)
    return records if len(records) >= expected else None


# --- length limits, both modes, on the real broker and database -------------------------------------------
def _truncated(field: str) -> float:
    return REGISTRY.get_sample_value("streamengine_samples_truncated_total", {"field": field}) or 0.0


@pytest.mark.parametrize("mode", ["reject", "truncate"])
async def test_overlength_texts_are_rejected_or_truncated(make_settings, tmp_path, mode: str) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(
        samples={"max_prompt_chars": 20, "max_completion_chars": 10, "overlength": mode}, kafka={"partitions": 1}
    )
    k = settings.kafka
    await ensure_topics(k)
    long_chat = [{"role": "system", "content": "S" * 15}, {"role": "user", "content": "abcdefghij"}]
    values = [
        feedback(1, prompt="P" * 25 + "END"),
        feedback(2, response="R" * 30),
        feedback(3, kind="correction", correction="BEGIN" + "C" * 20),
        feedback(4, prompt=long_chat),
        feedback(5, prompt="p" * 20, response="r" * 10),  # exactly at both limits
    ]
    before = {field: _truncated(field) for field in ("prompt", "completion")}
    await produce(k.bootstrap_servers, k.feedback_topic, values)
    async with ingest_replica(settings, tmp_path) as db:
        if mode == "reject":
            dlq = await wait_for(lambda: _at_least(k.bootstrap_servers, k.dlq_topic, 4), timeout_s=60)
            await wait_for(lambda: _count(db, 1), timeout_s=30)
        else:
            await wait_for(lambda: _count(db, 5), timeout_s=60)
            dlq = await read_all(k.bootstrap_servers, k.dlq_topic)
        rows = {r["event_id"]: r for r in await db.fetch("SELECT event_id, prompt, completion FROM samples")}
    after = {field: _truncated(field) for field in ("prompt", "completion")}
    if mode == "reject":
        reasons = {}
        for record in dlq:
            headers = {name: value.decode() for name, value in record.headers}
            reasons[json.loads(record.value)["event_id"]] = (headers["error.class"], headers["error.message"])
        assert reasons == {
            "e-1": ("too_long", "prompt is 28 characters, over samples.max_prompt_chars (20)"),
            "e-2": ("too_long", "response is 30 characters, over samples.max_completion_chars (10)"),
            "e-3": ("too_long", "correction is 25 characters, over samples.max_completion_chars (10)"),
            "e-4": ("too_long", "prompt is 25 characters, over samples.max_prompt_chars (20)"),
        }
        assert set(rows) == {"e-5"}
        assert after == before  # nothing truncated
    else:
        assert dlq == []
        assert rows["e-1"]["prompt"] == "P" * 17 + "END"  # the end of the prompt is kept
        assert rows["e-2"]["completion"] == "R" * 10
        assert rows["e-3"]["completion"] == "BEGINCCCCC"  # the start of the completion is kept
        assert rows["e-4"]["prompt"] == [{"role": "system", "content": "S" * 10}, long_chat[1]]
        assert (rows["e-5"]["prompt"], rows["e-5"]["completion"]) == ("p" * 20, "r" * 10)
        assert after["prompt"] - before["prompt"] == 2
        assert after["completion"] - before["completion"] == 2


# --- one user flooding a window ----------------------------------------------------------------------------
def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_flooding_user_is_capped_to_max_user_share(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(window={"max_samples": 200}, kafka={"partitions": 1})
    k = settings.kafka
    await ensure_topics(k)
    users = {}
    values = []
    for i in range(200):  # 4 of 5 events from one user, the rest from 10 others; weights 0.5-2
        user = "flood" if i % 5 else f"u{i // 5 % 10}"
        users[f"e-{i}"] = user
        values.append(feedback(i, user_id=user, weight=0.5 + (i * 7 % 16) / 10))
    capped_before = _counter("streamengine_weight_capped_total")
    downweighted_before = _counter("streamengine_samples_downweighted_total")
    await produce(k.bootstrap_servers, k.feedback_topic, values)
    async with ingest_replica(settings, tmp_path / "ingest") as db:
        job = await wait_for(lambda: db.fetchrow("SELECT id, window_id FROM jobs"), timeout_s=60)
        folder = tmp_path / "job"
        folder.mkdir()
        data = await dataset.prepare(db, settings, job["id"], settings.model.name, job["window_id"], folder)
    lines = [json.loads(line) for line in data.samples_path.read_text().splitlines()]
    window = [line for line in lines if line["source"] == "window"]
    weight: dict[str, float] = {}
    for line in window:
        weight[users[line["event_id"]]] = weight.get(users[line["event_id"]], 0.0) + line["weight"]
    total = sum(weight.values())
    flood_samples = sum(1 for line in window if users[line["event_id"]] == "flood")
    original = sum(
        0.5 + (int(line["event_id"][2:]) * 7 % 16) / 10 for line in window if users[line["event_id"]] == "flood"
    )
    assert flood_samples > 0.75 * len(window)  # the flooder sent most of the window
    assert weight["flood"] / total == pytest.approx(settings.learning.max_user_share, rel=1e-9)
    assert max(w for u, w in weight.items() if u != "flood") / total < settings.learning.max_user_share
    assert data.capped_weight == pytest.approx(original - weight["flood"], rel=1e-9)
    assert _counter("streamengine_weight_capped_total") - capped_before == pytest.approx(data.capped_weight)
    assert _counter("streamengine_samples_downweighted_total") - downweighted_before == flood_samples
