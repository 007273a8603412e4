"""SIGKILL `streamengine run` ten times during a 50,000-event stream: every sample once, every window once.

The stream is produced in one share per engine life, in small paced chunks, with a share of redelivered
duplicates (event ids sent before, on another partition) and of invalid records (DLQ). In each life the
engine is killed (the whole process group, SIGKILL) at a seeded random moment after it was seen ingesting,
then started again. At the end the database must hold exactly the distinct valid events, each in one
window, every closed window exactly at the threshold with one training job, and the windows' counters and
offset ranges must agree with the sample rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from typing import Any

import pytest

from streamengine.store.db import Database
from streamengine.stream.topics import ensure_topics
from tests import process_tools
from tests.kafka_tools import feedback, produce_batched, read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

TOTAL, WINDOW, KILLS, PARTITIONS = 50_000, 700, 10, 3
CHUNK, PACE_S = 500, 0.5
"""Each life's share goes out in chunks of CHUNK events, one every PACE_S seconds (about 1,000 events/s)."""


def _event(i: int) -> bytes:
    """Valid event ``e-<i>``: one in ten a thumbs_down (stored, not trainable)."""
    return feedback(i, kind="thumbs_down") if i % 10 == 3 else feedback(i)


def _chunk(rng: random.Random, start: int, end: int, bad: list[bytes]) -> list[bytes]:
    """Events ``start..end-1``, 2% redelivered events (sent before or in this chunk) and 0.4% invalid records."""
    values = [_event(i) for i in range(start, end)]
    values += [_event(rng.randrange(end)) for _ in range((end - start) // 50)]  # the same record, again
    for n in range((end - start) // 250):
        record = b"not json %d" % (start + n) if n % 2 else feedback(start + n, model="not-configured")
        values.insert(rng.randrange(len(values)), record)
        bad.append(record)
    rng.shuffle(values)  # duplicates before, after and among their originals
    return values


async def _stored(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM samples"))


async def test_ten_sigkills_during_50k_events_lose_and_duplicate_nothing(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    settings = make_settings(
        window={"max_samples": WINDOW, "schedule": "0 0 1 1 *"},  # no weekly tick closing a window mid-test
        # A killed member holds its partitions until its session times out: ~2.5 x session_timeout_s per restart.
        kafka={"partitions": PARTITIONS, "consumer": "aiokafka", "session_timeout_s": 3.0},
    )
    k = settings.kafka
    await ensure_topics(k)
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    run_log = tmp_path / "run.log"
    rng = random.Random(20240610)
    bad: list[bytes] = []
    bounds = [TOTAL * n // (KILLS + 1) for n in range(KILLS + 2)]
    db = await Database.connect(settings.database)
    engine = process_tools.start(["run"], config, run_log)
    producers: list[asyncio.Task[None]] = []
    kills: list[dict[str, Any]] = []
    produced = [0]  # valid events produced so far (their ids run 0 .. produced-1 within each share)

    async def share(start: int, end: int, rng: random.Random) -> None:
        for first in range(start, end, CHUNK):
            chunk = _chunk(rng, first, min(first + CHUNK, end), bad)
            await produce_batched(k.bootstrap_servers, k.feedback_topic, chunk, PARTITIONS)
            produced[0] += min(CHUNK, end - first)
            await asyncio.sleep(PACE_S)

    try:
        for life in range(KILLS + 1):
            producers.append(asyncio.create_task(share(bounds[life], bounds[life + 1], random.Random(rng.random()))))
            if life == KILLS:
                break
            seen = await _stored(db)
            await wait_for(lambda s=seen: _more_than(db, s), timeout_s=90)  # this life is ingesting now
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            stored = await _stored(db)
            process_tools.kill(engine)
            kills.append({"at_s": round(time.monotonic() - began, 1), "stored": stored, "produced": produced[0]})
            engine = process_tools.start(["run"], config, run_log)
        await asyncio.gather(*producers)
        valid = TOTAL  # distinct valid event ids e-0 .. e-49999; duplicates and invalid records add none
        with contextlib.suppress(AssertionError):  # a shortfall is reported by the counts below
            await wait_for(lambda: _at_least(db, valid), timeout_s=120)
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: _dlq_holds(k.bootstrap_servers, k.dlq_topic, set(bad)), timeout_s=60)
        dlq = {r.value for r in await read_all(k.bootstrap_servers, k.dlq_topic, timeout_s=10)}
        result = await _collect(db)  # every record was read: nothing changes the counts any more
    finally:
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        process_tools.stop(engine)
        await db.close()
    elapsed = time.monotonic() - began
    log.warning("sigkill stream: %d kills %s; %.1f s in all", len(kills), kills, elapsed)
    print(f"kills {kills}\nelapsed {elapsed:.1f} s, result {json.dumps(result['summary'])}")

    summary = result["summary"]
    # one start-up line per life ("streamengine running: model ..."; the program name may be masked in logs)
    assert len(kills) == KILLS and run_log.read_text().count(" running: model ") == KILLS + 1
    assert summary["samples"] == summary["distinct_events"] == valid  # nothing lost, nothing twice
    assert result["event_ids"] == {f"e-{i}" for i in range(TOTAL)}
    assert summary["distinct_records"] == valid  # no (partition, offset) stored under two event ids
    _check_windows(result["windows"], result["per_window"], result["jobs"])
    assert dlq == set(bad)  # every invalid record reached the DLQ (at least once), nothing else did


async def _more_than(db: Database, count: int) -> bool:
    return await _stored(db) > count


async def _at_least(db: Database, count: int) -> bool:
    return await _stored(db) >= count


async def _dlq_holds(bootstrap: str, topic: str, bad: set[bytes]) -> bool:
    return {r.value for r in await read_all(bootstrap, topic, timeout_s=10)} >= bad


async def _collect(db: Database) -> dict[str, Any]:
    summary = dict(
        await db.fetchrow(
            "SELECT count(*) AS samples, count(DISTINCT event_id) AS distinct_events,"
            " count(DISTINCT (source_partition, source_offset)) AS distinct_records FROM samples"
        )
    )
    event_ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM samples")}
    windows = [dict(r) for r in await db.fetch("SELECT * FROM windows ORDER BY id")]
    per_window = {
        r["window_id"]: dict(r)
        for r in await db.fetch(
            "SELECT window_id, sum(n) AS stored, sum(t) AS trainable, sum(w) AS weight,"
            " jsonb_object_agg(source_partition, lo) AS first, jsonb_object_agg(source_partition, hi) AS last"
            " FROM (SELECT window_id, source_partition, count(*) AS n,"
            "       count(*) FILTER (WHERE label > 0 AND weight > 0) AS t,"
            "       sum(weight) FILTER (WHERE label > 0 AND weight > 0) AS w,"
            "       min(source_offset) AS lo, max(source_offset) AS hi"
            "       FROM samples GROUP BY window_id, source_partition) s"
            " GROUP BY window_id"
        )
    }
    jobs = [dict(r) for r in await db.fetch("SELECT window_id, reason, kind FROM jobs ORDER BY id")]
    summary.update(windows=len(windows), jobs=len(jobs))
    return {"summary": summary, "event_ids": event_ids, "windows": windows, "per_window": per_window, "jobs": jobs}


def _check_windows(
    windows: list[dict[str, Any]], per_window: dict[int, dict[str, Any]], jobs: list[dict[str, Any]]
) -> None:
    closed = [w for w in windows if w["state"] == "closed"]
    open_ = [w for w in windows if w["state"] == "open"]
    trainable = TOTAL - TOTAL // 10
    assert len(open_) == 1 and open_[0] is windows[-1]  # one open window, the newest
    assert len(closed) == trainable // WINDOW
    assert all(w["samples"] == WINDOW and w["close_reason"] == "threshold" for w in closed)
    assert open_[0]["samples"] == trainable % WINDOW
    # exactly one training job per closed window, none for the open one
    assert sorted(j["window_id"] for j in jobs) == [w["id"] for w in closed]
    assert all(j["kind"] == "train" and j["reason"] == "threshold" for j in jobs)
    assert set(per_window) == {w["id"] for w in windows}  # every window holds samples, none a stranger's
    for window in windows:
        rows = per_window[window["id"]]
        # the window's counters are exactly its rows: no batch counted twice after a crash
        assert (window["stored"], window["samples"]) == (rows["stored"], rows["trainable"]), window["id"]
        assert window["weight"] == pytest.approx(rows["weight"] or 0.0)
        assert window["first_offsets"] == rows["first"] and window["last_offsets"] == rows["last"], window["id"]
    for earlier, later in itertools.pairwise(windows):
        # boundaries: the next window opens as the previous closes; per partition, offsets only move on
        assert earlier["closed_at"] is not None and earlier["closed_at"] <= later["opened_at"]
        for partition, last in earlier["last_offsets"].items():
            assert later["first_offsets"].get(partition, last + 1) > last, (earlier["id"], partition)
