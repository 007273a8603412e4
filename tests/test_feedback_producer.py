"""The serving nodes' feedback producer on the real broker: what it sends is stored by ingest with the version
that answered, invalid events never leave the call, a broker outage loses nothing, a full buffer pushes back."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from streamengine.config.settings import Settings
from streamengine.contract.events import FEEDBACK_TYPE, ChatMessage, FeedbackEvent
from streamengine.errors import BufferFull, InvalidFeedback, Undelivered
from streamengine.local.embedded import Tansu
from streamengine.serving import CallbackSwapper, FeedbackProducer, Subscriber
from streamengine.store.db import Database
from streamengine.stream.topics import ensure_topics
from tests.engine_tools import ingest_replica
from tests.kafka_tools import read_all
from tests.polling import wait_for
from tests.serving_tools import Fleet

pytestmark = pytest.mark.integration

BAD = [
    ({"kind": "rating", "rating": 9}, "rating"),
    ({"kind": "sideways"}, "kind"),
    ({"kind": "thumbs_up", "weight": -1.0}, "weight"),
]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _stored(db: Database) -> dict[str, str | None]:
    rows = await db.fetch("SELECT event_id, adapter_version FROM samples")
    return {row["event_id"]: row["adapter_version"] for row in rows}


def _adapter_files(folder: Path) -> Path:
    """What a release names: the subscriber downloads and checks these; its callback swapper loads nothing."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(uuid.uuid4().bytes)
    return folder


async def _refused_at_the_call(feedback: FeedbackProducer) -> None:
    for fields, field in BAD:
        with pytest.raises(InvalidFeedback) as raised:
            await feedback.send(prompt="p", response="r", **fields)
        assert raised.value.field == field and str(raised.value).startswith(f"{field}: ")
    with pytest.raises(InvalidFeedback, match="over the 4096-byte limit"):
        await feedback.send(prompt="p" * 5000, response="r", kind="thumbs_up")


async def test_events_are_stored_with_the_version_that_answered(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(kafka={"max_record_bytes": 4096})
    k, model = settings.kafka, settings.model.name
    await ensure_topics(k)
    fleet, folder = Fleet(settings, model), _adapter_files(tmp_path / "adapter")
    node = Subscriber(settings, CallbackSwapper(lambda *_: None))
    await node.apply(fleet.release(folder, "v1.0"))
    invalid_before = _metric("streamengine_producer_events_failed_total", model=model, reason="invalid")
    reported: list[tuple[str | None, Undelivered | None]] = []
    async with FeedbackProducer(
        settings, versions=node, on_delivery=lambda record, error: reported.append((record.event_id, error))
    ) as feedback:
        began_on = feedback.version()  # a streamed answer begins on v1.0 ...
        first = await feedback.send_and_wait(prompt="2+2?", response="4", kind="thumbs_up", user_id="u-1")
        await node.apply(fleet.release(folder, "v1.1"))  # ... and the node swaps while it streams
        rated = FeedbackEvent(
            event_id="rated-1", model=model, prompt=[ChatMessage(role="user", content="hi")], response="hello",
            kind="rating", rating=5, session_id="s-9",
        )  # fmt: skip
        await feedback.send_and_wait(rated)
        streamed = await feedback.send_and_wait(
            prompt="A story?", response="Once upon a time", kind="thumbs_down", adapter_version=began_on
        )
        await _refused_at_the_call(feedback)
    assert _metric("streamengine_producer_events_failed_total", model=model, reason="invalid") == invalid_before + 4
    assert len(reported) == 3 and all(error is None for _, error in reported)

    async with ingest_replica(settings, tmp_path / "ingest") as db:
        stored = await wait_for(lambda: _stored_if(db, 3), timeout_s=30)
    ids = [first.record.event_id, "rated-1", streamed.record.event_id]
    assert stored == {ids[0]: "v1.0", "rated-1": "v1.1", ids[2]: "v1.0"}
    assert uuid.UUID(ids[0]).version == 7

    records = await read_all(k.bootstrap_servers, k.feedback_topic)  # the invalid ones never reached it
    headers = [dict(r.headers) for r in records]
    keys = {h["ce_id"].decode(): r.key for r, h in zip(records, headers, strict=True)}
    assert keys == {ids[0]: b"u-1", "rated-1": b"s-9", ids[2]: None}  # user id, else session id
    assert all(h["ce_type"] == FEEDBACK_TYPE.encode() and h["ce_specversion"] == b"1.0" for h in headers)


async def _stored_if(db: Database, count: int) -> dict[str, str | None] | None:
    stored = await _stored(db)
    return stored if len(stored) >= count else None


async def test_a_broker_outage_mid_send_loses_nothing(make_settings, services, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    broker = Tansu(tmp_path / "logs", s3=services.s3, bucket=f"tansu-feedback-{uuid.uuid4().hex[:8]}").start()
    try:
        settings: Settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap})
        await ensure_topics(settings.kafka)
        caplog.set_level(logging.WARNING, logger="streamengine.stream.sender")
        async with FeedbackProducer(settings, attempt_timeout_s=1.0) as feedback:
            sent = [await feedback.send(prompt=f"q{i}", response="a", kind="thumbs_up", user_id=f"u{i % 7}")
                    for i in range(100)]  # fmt: skip
            await asyncio.to_thread(broker.stop)
            sent += [await feedback.send(prompt=f"q{i}", response="a", kind="thumbs_up", user_id=f"u{i % 7}")
                     for i in range(100, 200)]  # fmt: skip
            await asyncio.sleep(3)  # three attempt timeouts: the sender puts records back and tries again
            await asyncio.to_thread(broker.start)
            delivered = await asyncio.wait_for(asyncio.gather(*sent), 60)
        assert "trying again" in caplog.text
        ids = {d.record.event_id for d in delivered}
        assert len(ids) == 200
        records = await read_all(broker.bootstrap, settings.kafka.feedback_topic)
        assert {dict(r.headers)["ce_id"].decode() for r in records} == ids  # at least once: maybe some twice
        async with ingest_replica(settings, tmp_path / "ingest") as db:
            stored = await wait_for(lambda: _stored_if(db, 200), timeout_s=60)
            await asyncio.sleep(1)  # ingest has read every record by then: a second copy would show now
            assert set(await _stored(db)) == set(stored) == ids  # duplicates dropped
    finally:
        broker.stop()


async def test_a_full_buffer_pushes_back_and_close_returns_the_rest(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = Tansu(tmp_path / "logs").start()
    try:
        settings: Settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap})
        await ensure_topics(settings.kafka)
        model = settings.model.name
        reported: list[Undelivered | None] = []
        waiting = FeedbackProducer(
            settings, max_buffered=5, attempt_timeout_s=1.0, on_delivery=lambda _, error: reported.append(error)
        )
        await waiting.start()
        with pytest.raises(Undelivered) as raised:
            async with FeedbackProducer(
                settings, max_buffered=5, block=False, attempt_timeout_s=1.0, close_timeout_s=0.5
            ) as refusing:
                await asyncio.to_thread(broker.stop)
                for producer in (waiting, refusing):
                    for i in range(5):
                        await producer.send(prompt=f"q{i}", response="a", kind="thumbs_up")
                assert waiting.buffered == refusing.buffered == 5
                assert _metric("streamengine_producer_buffered_events", model=model) >= 10
                with pytest.raises(TimeoutError):  # waits for room, taking nothing
                    await asyncio.wait_for(waiting.send(prompt="q", response="a", kind="thumbs_up"), 1.0)
                with pytest.raises(BufferFull):
                    await refusing.send(prompt="q", response="a", kind="thumbs_up")
                assert waiting.buffered == refusing.buffered == 5
        assert len(raised.value.records) == 5  # `async with` raises what close() could not deliver
        closed_before = _metric("streamengine_producer_events_failed_total", model=model, reason="closed")
        left = await waiting.close(timeout_s=0.5)
        assert len(left) == 5 and all(json.loads(r.value)["prompt"].startswith("q") for r in left)
        assert len(reported) == 5 and all(error is not None and error.reason == "closed" for error in reported)
        assert _metric("streamengine_producer_events_failed_total", model=model, reason="closed") == closed_before + 5
    finally:
        broker.stop()
