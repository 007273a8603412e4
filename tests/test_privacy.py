"""Privacy on the real engine (tansu, PostgreSQL, S3): redaction before storage, retention, forgetting a user
through the admin API and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from streamengine.config.settings import DatabaseSettings, Settings
from streamengine.contract.events import FeedbackEvent
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.store import privacy, windows
from streamengine.store.db import Database
from streamengine.stream.topics import ensure_topics
from tests.engine_tools import add_adapter, ingest_replica, metric
from tests.kafka_tools import feedback, produce
from tests.polling import wait_for

pytestmark = pytest.mark.integration

TOKEN = "test-privacy-token-9c2e"
MODEL = "tiny-llama"


@dataclass
class Engine:
    settings: Settings
    config: Path
    http: httpx.AsyncClient
    db: Database


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(services, tmp_path_factory) -> AsyncIterator[Engine]:  # type: ignore[no-untyped-def]
    from streamengine.local.embedded import acreate_database, adrop_database
    from tests import process_tools
    from tests.engine_tools import engine_running
    from tests.settings_tools import clear_environment, module_settings

    workdir = tmp_path_factory.mktemp("privacy")
    name = f"se_test_{uuid.uuid4().hex[:12]}"
    dsn = await acreate_database(services.pg_admin_dsn, name)
    with pytest.MonkeyPatch.context() as patch:
        clear_environment(patch)
        settings = module_settings(
            services,
            dsn,
            workdir,
            api={"token": TOKEN},
            kafka={"partitions": 1},
            privacy={
                "retention_days": 1,
                "patterns": {"ticket": r"TICKET-\d{4,}"},
                "function": "tests.privacy_functions:redact_names",
            },
        )
        config = process_tools.write_config(settings, workdir / "config.yaml")
        async with engine_running(settings) as http:
            db = await Database.connect(settings.database, migrate=False)
            yield Engine(settings, config, http, db)
            await db.close()
    await adrop_database(services.pg_admin_dsn, name)


async def add_samples(db: Database, prefix: str, count: int, user: str | None = None) -> None:
    """Thumbs-up samples ``<prefix>-0`` ... into the open window, written as ingest writes them."""
    policy = SamplePolicy(kind_weights={"thumbs_up": 1.0})
    rows = []
    for i in range(count):
        event = FeedbackEvent(
            event_id=f"{prefix}-{i}", model=MODEL, prompt=f"Q{i}?", response=f"A{i}", kind="thumbs_up", user_id=user
        )
        rows.append((to_sample(event, policy), None, None))
    await windows.write_batch(db, rows, WindowPolicy(max_samples=10_000))


async def close_window(db: Database) -> tuple[int, int]:
    """Close the open window (manual); its id and its job's id."""
    closed = await windows.close_now(db, MODEL, "manual")
    assert closed is not None
    return closed.window_id, closed.job_id


async def open_window(db: Database) -> Any:
    return await db.fetchrow(
        "SELECT id, samples, weight, stored FROM windows WHERE model = $1 AND state = 'open'", MODEL
    )


async def count(db: Database, like: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM samples WHERE event_id LIKE $1", like))


async def test_stored_samples_are_redacted_through_the_broker_into_postgresql(engine: Engine) -> None:
    k = engine.settings.kafka
    before = {kind: await metric(engine.http, "streamengine_redactions_total", kind=kind) or 0.0
              for kind in ("email", "phone", "card", "ticket", "function")}  # fmt: skip
    events = [
        {"event_id": "red-1", "prompt": "I am alice@example.com, call me on +44 20 7946 0958",
         "response": "Charged 4111 1111 1111 1111.", "kind": "thumbs_up", "user_id": "u-red"},
        {"event_id": "red-2", "prompt": [{"role": "system", "content": "Help Alice."},
                                         {"role": "user", "content": "About TICKET-12345: (555) 123-4567"}],
         "response": "Noted.", "kind": "rating", "rating": 5, "user_id": "u-red"},
        {"event_id": "red-3", "prompt": "Who to write to?", "response": "Nobody.", "kind": "correction",
         "correction": "Write to Bob at bob@example.org.", "user_id": "u-red"},
        {"event_id": "red-4", "prompt": "Release 1.2.3 on 2024-01-15 for order 4111111111111112 (42 items)?",
         "response": "Version v10.0.19041 at 10:30:45, ticket TICKET-12.", "kind": "thumbs_up"},
    ]  # fmt: skip
    await produce(k.bootstrap_servers, k.feedback_topic, [json.dumps({"model": MODEL, **e}).encode() for e in events])

    async def stored() -> list[Any] | None:
        rows = await engine.db.fetch("SELECT * FROM samples WHERE event_id LIKE 'red-%' ORDER BY event_id")
        return rows if len(rows) == len(events) else None

    rows = {r["event_id"]: r for r in await wait_for(stored, timeout_s=60)}
    assert rows["red-1"]["prompt"] == "I am [email], call me on [phone]"
    assert rows["red-1"]["completion"] == "Charged [card]."
    assert rows["red-2"]["prompt"] == [
        {"role": "system", "content": "Help [name]."},
        {"role": "user", "content": "About [ticket]: [phone]"},
    ]
    assert rows["red-3"]["completion"] == "Write to [name] at [email]."
    assert rows["red-4"]["prompt"] == events[3]["prompt"]  # dates, versions, a non-Luhn id: kept
    assert rows["red-4"]["completion"] == events[3]["response"]
    assert rows["red-1"]["user_id"] == "u-red"  # ids are not text: forget finds the user by them
    # Every stored field but the server's clock (its microseconds once held "7946").
    everything = json.dumps([{k: v for k, v in r.items() if k != "stored_at"} for r in rows.values()], default=str)
    for secret in ("alice@example.com", "7946", "4111 1111", "12345", "123-4567", "bob@example.org", "Alice", "Bob"):
        assert secret not in everything, secret
    after = {kind: await metric(engine.http, "streamengine_redactions_total", kind=kind) for kind in before}
    # The response of the correction (not stored) is redacted too, so only lower bounds for the function.
    assert {kind: (after[kind] or 0.0) - before[kind] for kind in ("email", "phone", "card", "ticket")} == {
        "email": 2, "phone": 2, "card": 1, "ticket": 1
    }  # fmt: skip
    assert (after["function"] or 0.0) - before["function"] >= 2


async def test_retention_deletes_old_samples_except_windows_a_job_needs(engine: Engine) -> None:
    db = engine.db
    if (await open_window(db) or {"samples": 0})["samples"]:
        await close_window(db)  # samples of earlier tests are fresh: the retention loop leaves them
    await add_samples(db, "ret-a", 5)
    _, queued_job = await close_window(db)  # its job is queued: retention keeps its samples
    await add_samples(db, "ret-b", 5)
    _, done_job = await close_window(db)
    await db.execute("UPDATE jobs SET state = 'released' WHERE id = $1", done_job)
    await add_samples(db, "ret-c", 5)  # the open window
    await add_samples(db, "ret-fresh", 2)
    window = await open_window(db)
    expired = await metric(engine.http, "streamengine_samples_expired_total") or 0.0
    await db.execute("UPDATE samples SET stored_at = now() - interval '25 hours' WHERE event_id LIKE 'ret-_-%'")

    async def only_the_queued_window_left() -> bool:
        return await count(db, "ret-_-%") == 5

    await wait_for(only_the_queued_window_left, 30, describe=lambda: count(db, "ret-_-%"))
    assert await count(db, "ret-a-%") == 5 and await count(db, "ret-fresh-%") == 2
    now = await open_window(db)
    assert now["id"] == window["id"]
    assert (now["samples"], now["stored"]) == (window["samples"] - 5, window["stored"] - 5)
    assert now["weight"] == pytest.approx(window["weight"] - 5)
    assert (await metric(engine.http, "streamengine_samples_expired_total") or 0.0) - expired == 10

    await db.execute("UPDATE jobs SET state = 'failed' WHERE id = $1", queued_job)  # the job no longer needs them

    async def all_expired() -> bool:
        return await count(db, "ret-_-%") == 0

    await wait_for(all_expired, 30)
    assert await count(db, "ret-fresh-%") == 2
    query = "SELECT samples, stored FROM windows w JOIN jobs j ON j.window_id = w.id WHERE j.id = $1"
    closed = await db.fetchrow(query, queued_job)
    assert (closed["samples"], closed["stored"]) == (5, 5)  # a closed window keeps what it held when it closed


async def test_retention_batches_are_bounded_and_a_second_replica_waits(pg_dsn: str) -> None:
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        await add_samples(db, "old", 7)
        await add_samples(db, "new", 3)
        await db.execute("UPDATE samples SET stored_at = now() - interval '3 days' WHERE event_id LIKE 'old-%'")
        assert await privacy.expire(db, days=2, batch_size=2, max_batches=2) == 4  # two batches of two, oldest first
        assert await count(db, "old-%") == 3
        async with db.pool.acquire() as other, other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", 0x5E_0005)  # another replica's pass
            assert await privacy.expire_batch(db, 2, 100) is None
        assert await privacy.expire(db, days=2, batch_size=2) == 3
        assert await privacy.expire(db, days=2, batch_size=2) == 0
        assert await count(db, "new-%") == 3
        window = await db.fetchrow("SELECT samples, stored FROM windows WHERE state = 'open'")
        assert (window["samples"], window["stored"]) == (3, 3)
    finally:
        await db.close()


async def _release(db: Database, version: str, window_id: int, job_id: int | None, **manifest: Any) -> None:
    """A registry row for ``window_id`` (by its job when given, else by its manifest's window)."""
    await add_adapter(db, version, window={"id": window_id, "samples": 1, "weight": 1.0}, **manifest)
    if job_id is not None:
        await db.execute("UPDATE jobs SET state = 'released' WHERE id = $1", job_id)
        await db.execute("UPDATE adapters SET job_id = $1 WHERE version = $2", job_id, version)


async def _history(db: Database, user: str) -> dict[str, int]:
    """Windows before, with, after the user's samples, released as v1.0 .. v1.3 (v1.3 deleted since), a running job
    and the user's sample in the open window."""
    if (await open_window(db) or {"samples": 0})["samples"]:
        await close_window(db)
    await add_samples(db, f"{user}-pre-other", 2, "someone-else")
    pre, pre_job = await close_window(db)
    await add_samples(db, f"{user}-x", 3, user)
    await add_samples(db, f"{user}-x-other", 2, "someone-else")
    with_user, with_job = await close_window(db)
    await add_samples(db, f"{user}-z-other", 2, "someone-else")
    after, _ = await close_window(db)
    await add_samples(db, f"{user}-r-other", 1, "someone-else")
    _, running_job = await close_window(db)
    await db.execute("UPDATE jobs SET state = 'running' WHERE id = $1", running_job)
    versions = await db.fetch("SELECT version FROM adapters WHERE model = $1", MODEL)
    major = 1 + max((int(v["version"][1:].split(".")[0]) for v in versions), default=0)
    await _release(db, f"v{major}.0", pre, pre_job)
    await _release(db, f"v{major}.1", with_user, with_job, parent_version=f"v{major}.0")
    await _release(db, f"v{major}.2", after, None, parent_version=f"v{major}.1")
    await _release(db, f"v{major}.3", after, None, parent_version=f"v{major}.2")
    await db.execute("UPDATE adapters SET deleted_at = now() WHERE version = $1", f"v{major}.3")
    await add_samples(db, f"{user}-open", 1, user)
    await add_samples(db, f"{user}-open-other", 1, "someone-else")
    return {"major": major, "with_user": with_user, "running_job": running_job}


async def test_forget_deletes_a_users_samples_and_reports_the_versions_trained_on_them(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    db, user = engine.db, "u-forget-7d1"
    history = await _history(db, user)
    major = history["major"]
    window = await open_window(db)
    requests = await metric(engine.http, "streamengine_forget_requests_total") or 0.0
    anonymous = await engine.http.post("/users/forget", json={"user_id": user}, headers={"Authorization": ""})
    assert anonymous.status_code == 401 and await count(db, f"{user}-%") == 12
    assert (await engine.http.post("/users/forget", json={"user_id": ""})).status_code == 422
    assert (await engine.http.post("/users/forget", json={"user": user})).status_code == 422

    with caplog.at_level(logging.INFO, logger="streamengine.api"):
        response = await engine.http.post("/users/forget", json={"user_id": user})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deleted_samples"] == 4
    assert body["windows"] == [history["with_user"], window["id"]]
    assert body["trained_on"] == [{"model": MODEL, "version": f"v{major}.1", "deleted": False}]
    assert body["later_versions"] == [
        {"model": MODEL, "version": f"v{major}.2", "deleted": False},
        {"model": MODEL, "version": f"v{major}.3", "deleted": True},
    ]
    assert body["running_jobs"] == [history["running_job"]]

    assert await db.fetchval("SELECT count(*) FROM samples WHERE user_id = $1", user) == 0
    assert await count(db, f"{user}-%") == 8  # everyone else's samples stay
    now = await open_window(db)
    assert (now["samples"], now["stored"]) == (window["samples"] - 1, window["stored"] - 1)
    assert await metric(engine.http, "streamengine_forget_requests_total") == requests + 1
    logged = [r.getMessage() for r in caplog.records if body["request_id"] in r.getMessage()]
    assert len(logged) == 1 and f"v{major}.1" in logged[0] and "4 samples" in logged[0]
    assert all(user not in r.getMessage() for r in caplog.records)

    again = (await engine.http.post("/users/forget", json={"user_id": user})).json()  # idempotent
    assert (again["deleted_samples"], again["trained_on"], again["later_versions"]) == (0, [], [])


async def cli(engine: Engine, *args: str, **extra: str) -> Any:
    """The CLI in a thread (the engine in this loop keeps answering), as a script would run it."""
    from click.testing import CliRunner

    from streamengine.cli.main import cli as program

    env = {"STREAMENGINE_CONFIG": str(engine.config), "COLUMNS": "200", **extra}
    return await asyncio.to_thread(CliRunner().invoke, program, list(args), env=env)


async def test_forget_from_the_command_line(engine: Engine) -> None:
    db = engine.db
    helped = await cli(engine, "forget", "--help")
    assert helped.exit_code == 0 and "--user-id" in helped.output and "not unlearned" in helped.output
    assert (await cli(engine, "forget")).exit_code == 2  # --user-id is required

    history = await _history(db, "u-cli-1")
    result = await cli(engine, "forget", "--user-id", "u-cli-1", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    major = history["major"]
    assert (body["deleted_samples"], [v["version"] for v in body["trained_on"]]) == (4, [f"v{major}.1"])
    assert [v["version"] for v in body["later_versions"]] == [f"v{major}.2", f"v{major}.3"]
    assert await db.fetchval("SELECT count(*) FROM samples WHERE user_id = 'u-cli-1'") == 0

    await add_samples(db, "u-cli-2-x", 2, "u-cli-2")
    text = await cli(engine, "forget", "--user-id", "u-cli-2")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith("deleted 2 samples (request ")
    assert lines[1] == "released versions trained on them (not unlearned): -"
    assert await db.fetchval("SELECT count(*) FROM samples WHERE user_id = 'u-cli-2'") == 0
    refused = await cli(engine, "forget", "--user-id", "u-cli-2", STREAMENGINE_API__TOKEN="wrong")
    assert refused.exit_code == 2 and "HTTP 401" in refused.output, refused.output


def _forgotten_events() -> float:
    return REGISTRY.get_sample_value("streamengine_events_forgotten_total") or 0.0


async def _user_samples(db: Database, user: str) -> list[str]:
    rows = await db.fetch("SELECT event_id FROM samples WHERE user_id = $1 ORDER BY event_id", user)
    return [r["event_id"] for r in rows]


async def test_a_forgotten_user_does_not_come_back_from_kafka(make_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Forget a user while their events are still in Kafka, then consume the topic again (as after a crash
    before the offsets were committed, or a rewind): none of their events made before the forget is stored
    again, whether it had been stored, was still unread, or is sent again later with its own (old) time; a
    new one is. Everyone else's events stay as they were."""
    settings: Settings = make_settings(kafka={"partitions": 1})
    again: Settings = make_settings(kafka={"partitions": 1, "group_id": f"{settings.kafka.group_id}-again"})
    await ensure_topics(settings.kafka)
    k = settings.kafka
    resent = feedback(20, user_id="u-gone", timestamp=(datetime.now(UTC) - timedelta(hours=1)).isoformat())
    first = [feedback(i, user_id="u-gone") for i in range(5)] + [resent]
    first += [feedback(10 + i, user_id="u-stays") for i in range(3)]
    await produce(k.bootstrap_servers, k.feedback_topic, first)
    async with ingest_replica(settings, tmp_path / "a") as db:
        await wait_for(lambda: _samples_are(db, 9), timeout_s=60)
    await produce(k.bootstrap_servers, k.feedback_topic, [feedback(30, user_id="u-gone")])  # unread at the forget
    db = await Database.connect(settings.database)
    try:
        assert (await privacy.forget_user(db, "u-gone")).deleted_samples == 6
        dropped = _forgotten_events()
        async with ingest_replica(again, tmp_path / "b"):
            await wait_for(lambda: _forgotten_events() - dropped == 7, timeout_s=60)  # e-0..4, e-20, e-30
            await produce(k.bootstrap_servers, k.feedback_topic, [resent, feedback(40, user_id="u-gone")])
            await wait_for(lambda: _user_samples(db, "u-gone"), timeout_s=60)
        assert await _user_samples(db, "u-gone") == ["e-40"]
        assert await _user_samples(db, "u-stays") == ["e-10", "e-11", "e-12"]
        assert _forgotten_events() - dropped == 8  # the old event sent again too
    finally:
        await db.close()


async def _samples_are(db: Database, expected: int) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM samples")) == expected


async def test_forget_waits_for_the_batch_in_flight_and_later_batches_see_the_tombstone(pg_dsn: str) -> None:
    """A batch that holds its window's lock when the forget comes commits first, and its sample of the user (the
    first one: nothing of the user was stored before) is deleted too; batches after it drop the user's events
    made before the forget (by the event's time or its record's), also for a user who had nothing stored."""
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        await add_samples(db, "race-a", 1, "someone-else")  # the open window; nothing of the user is stored yet
        async with db.pool.acquire() as ingest, ingest.transaction():  # what an ingest batch does, in order
            await ingest.execute("SELECT 1 FROM windows WHERE model = $1 AND state = 'open' FOR UPDATE", MODEL)
            await ingest.execute(
                "INSERT INTO samples (event_id, model, window_id, kind, prompt, completion, weight, label, user_id)"
                " SELECT 'race-b', model, id, 'thumbs_up', '\"q\"', 'a', 1, 1, 'u-race' FROM windows"
                " WHERE model = $1 AND state = 'open'",
                MODEL,
            )
            forget = asyncio.create_task(privacy.forget_user(db, "u-race"))
            await asyncio.sleep(1.0)
            assert not forget.done()  # it waits for the batch
        assert (await forget).deleted_samples == 1  # the batch's sample, committed while the forget waited
        await privacy.forget_user(db, "u-never-stored")
        forgotten_at = time.time() * 1000
        policy = SamplePolicy(kind_weights={"thumbs_up": 1.0})
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        events = [
            FeedbackEvent(event_id="old-time", model=MODEL, prompt="q", response="a", kind="thumbs_up",
                          user_id="u-race", timestamp=hour_ago),
            FeedbackEvent(event_id="old-record", model=MODEL, prompt="q", response="a", kind="thumbs_up",
                          user_id="u-never-stored"),
            FeedbackEvent(event_id="new", model=MODEL, prompt="q", response="a", kind="thumbs_up", user_id="u-race"),
            FeedbackEvent(event_id="other", model=MODEL, prompt="q", response="a", kind="thumbs_up",
                          user_id="u-other", timestamp=hour_ago),
        ]  # fmt: skip
        rows = [(to_sample(event, policy), 0, offset) for offset, event in enumerate(events)]
        produced = [int(forgotten_at) + 5_000, int(forgotten_at) - 60_000, int(forgotten_at) + 5_000, None]
        outcome = await windows.write_batch(db, rows, WindowPolicy(max_samples=100), produced_ms=produced)
        assert (outcome.inserted, outcome.forgotten) == (2, 2)
        stored = await db.fetch(
            "SELECT event_id FROM samples WHERE event_id = ANY($1::text[])", [e.event_id for e in events]
        )
        assert sorted(r["event_id"] for r in stored) == ["new", "other"]
    finally:
        await db.close()
