"""SIGKILL `streamengine run` mid-canary: the trial is decided once after the restarts, on every feedback event
counted once, and its release and end records reach the topics once.

A line with production v1.0 and v1.1 on trial (the worker's release path without the training, nodes written as
the engine's status consumer writes them: tests/test_rollout_canary.py's helpers). The engine runs as a real
process. Life 1: it ingests production's feedback and half the canary's (below ``rollout.min_events``) and is
killed while ingesting. The rest of the canary's feedback is sent while it is down. Life 2: it counts the rest
and promotes the canary; it is killed as soon as the decision is committed (the outbox may not have been
relayed yet). Life 3: it relays what is left, and finds nothing more to decide.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from streamengine.contract.events import AdapterCanary, AdapterReleased
from streamengine.store import registry, rollouts
from streamengine.store.db import Database
from streamengine.stream.ingest import IngestPipeline
from streamengine.stream.producer import start_producer
from streamengine.stream.topics import ensure_topics
from tests import process_tools
from tests.kafka_tools import feedback, produce_batched, read_all
from tests.polling import wait_for
from tests.test_rollout_canary import KEY, MODEL, Line, _on_trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 200  # on each side; rollout.min_events is 150
NEGATIVE_EVERY = 20  # 5% thumbs down on both sides: an equal canary


def _thumbs(version: str, first: int, count: int) -> list[bytes]:
    """``count`` thumbs naming ``version`` (event ids ``e-<first>`` on), one in NEGATIVE_EVERY down, 40 users."""
    return [
        feedback(
            i,
            adapter_version=version,
            user_id=f"user-{i % 40}",
            kind="thumbs_down" if i % NEGATIVE_EVERY == 0 else "thumbs_up",
        )
        for i in range(first, first + count)
    ]


async def _counted(db: Database, version: str) -> int:
    query = (
        "SELECT coalesce(sum(positive + negative + neutral), 0) FROM rollout_outcomes WHERE model = $1 AND version = $2"
    )
    return int(await db.fetchval(query, MODEL, version))


async def test_an_engine_killed_mid_canary_decides_it_once_on_every_event_once(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    settings = make_settings(
        signing_key=KEY,
        rollout={"canary_fraction": 0.34, "min_events": 150, "max_user_share": 0.05, "max_regression": 0.05},
        window={"max_samples": 100_000, "schedule": "0 0 1 1 *"},
        kafka={"session_timeout_s": 3.0},
    )
    k = settings.kafka
    await ensure_topics(k)
    db = await Database.connect(settings.database)
    producer = await start_producer(k)
    try:
        production, canary = await _on_trial(Line(settings, db, IngestPipeline(settings, db, producer)))
    finally:
        await producer.stop()
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    log = tmp_path / "run.log"
    half = EVENTS // 2
    lives: list[dict[str, Any]] = []
    engine = process_tools.start(["run"], config, log)
    try:
        # Life 1: production's feedback and half the canary's; killed once it has counted some of the canary's.
        values = _thumbs(production, 0, EVENTS) + _thumbs(canary, EVENTS, half)
        await produce_batched(k.bootstrap_servers, k.feedback_topic, values, k.partitions)
        await wait_for(lambda: _counted(db, canary), timeout_s=90, describe=lambda: log.read_text()[-3000:])
        process_tools.kill(engine)
        lives.append({"killed_at_s": round(time.monotonic() - began, 1), "canary_counted": await _counted(db, canary)})
        trial = await rollouts.of_version(db, MODEL, canary)
        assert trial is not None and trial.state == "running"  # undecided: below min_events on the canary's side
        # Down: the rest of the canary's feedback. Life 2: killed as soon as the decision is committed.
        await produce_batched(k.bootstrap_servers, k.feedback_topic, _thumbs(canary, EVENTS + half, half), k.partitions)
        engine = process_tools.start(["run"], config, log)

        async def decided() -> bool:
            trial = await rollouts.of_version(db, MODEL, canary)
            return trial is not None and trial.state != "running"

        await wait_for(decided, timeout_s=90, interval_s=0.05, describe=lambda: log.read_text()[-3000:])
        process_tools.kill(engine)
        lives.append({"killed_at_s": round(time.monotonic() - began, 1), "unsent_outbox": await _unsent(db)})
        # Life 3: relays what the kill left in the outbox.
        engine = process_tools.start(["run"], config, log)
        await wait_for(lambda: _no_unsent(db), timeout_s=60, describe=lambda: log.read_text()[-3000:])
    finally:
        process_tools.stop(engine)
    try:
        trials = await db.fetch("SELECT state, decision FROM rollouts WHERE model = $1 AND version = $2", MODEL, canary)
        assert [t["state"] for t in trials] == ["promoted"], lives
        decision = trials[0]["decision"]
        assert decision["rule"] == "not_worse" and decision["by"] == "engine", decision
        # Every event counted once: none lost in a kill, none counted again on redelivery.
        assert (decision["canary"]["events"], decision["production"]["events"]) == (EVENTS, EVENTS), (decision, lives)
        assert decision["canary"]["negatives"] == decision["production"]["negatives"] == EVENTS // NEGATIVE_EVERY
        assert (await _counted(db, canary), await _counted(db, production)) == (EVENTS, EVENTS)
        assert await registry.alias(db, MODEL, "production") == canary
        assert await registry.alias(db, MODEL, "canary") is None
        stage = "SELECT stage FROM adapters WHERE model = $1 AND version = $2"
        assert await db.fetchval(stage, MODEL, canary) == "production"
    finally:
        await db.close()
    records = await read_all(k.bootstrap_servers, k.released_topic)
    released = [AdapterReleased.model_validate_json(r.value) for r in records]
    ended = [
        record
        for r in await read_all(k.bootstrap_servers, k.canary_topic)
        if (record := AdapterCanary.model_validate_json(r.value)).stage == "ended"
    ]
    # Each announcement once (the relay is at least once: a record sent again after a kill keeps its event id,
    # which is how a subscriber knows it), so distinct event ids are what the decision must not double.
    assert [e.version for e in {e.event_id: e for e in released}.values()] == [production, canary], released
    assert [(e.version, e.outcome) for e in {e.event_id: e for e in ended}.values()] == [(canary, "promoted")], ended
    print(
        f"lives: {lives}; released records {len(released)}, ended records {len(ended)}; {time.monotonic() - began:.0f}s"
    )


async def _unsent(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))


async def _no_unsent(db: Database) -> bool:
    return await _unsent(db) == 0
