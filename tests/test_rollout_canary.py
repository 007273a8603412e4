"""Canary releases on real PostgreSQL and Kafka: the release goes on trial, ingest counts the outcomes of the
feedback naming each version, the judge decides once and applies it through the outbox, operators promote or
abort, and jobs wait meanwhile.

Releases take the worker's release path without the training (a claimed job, ``worker.canary_for``,
``job_queue.release``); the fleet is written as the engine's status consumer writes it (``fleet.record_status``);
feedback goes through the real ingest pipeline.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterCanary, AdapterReleased, LoraSpec, NodeStatus
from streamengine.core.manifest import Signer, signature_valid
from streamengine.core.release import build_release
from streamengine.core.rollout import Action, Rule
from streamengine.errors import Conflict
from streamengine.jobs.rollout import judge_once, policy_of
from streamengine.jobs.worker import canary_for
from streamengine.store import fleet, job_queue, registry, rollouts
from streamengine.store.db import Database
from streamengine.stream.ingest import IngestPipeline, RawRecord
from streamengine.stream.outbox import relay_once
from streamengine.stream.producer import start_producer
from tests.kafka_tools import feedback, read_all

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
NODES = ["node-a", "node-b", "node-c"]
KEY = "canary-test-signing-key-0123456789"


@dataclass
class Line:
    settings: Settings
    db: Database
    pipeline: IngestPipeline
    offset: int = 0

    async def node(self, node_id: str, state: str = "serving", target: str | None = None, canary: bool = True) -> None:
        production = await registry.alias(self.db, MODEL, "production")
        status = NodeStatus(
            node_id=node_id,
            model=MODEL,
            version=production,
            stage="production",
            state=state,  # type: ignore[arg-type]
            target_version=target,
            reason="load failed" if state == "failed" else None,
            heartbeat_at=datetime.now(UTC),
            canary=canary,
        )
        await fleet.record_status(self.db, status)

    async def release(self) -> str:
        """The worker's release step for a new job of the line (canary or production as the settings say)."""
        await self.db.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", MODEL)
        window = await self.db.fetchval("INSERT INTO windows (model, state) VALUES ($1, 'closed') RETURNING id", MODEL)
        job_id = await self.db.fetchval("INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'threshold')"
                                        " RETURNING id", MODEL, window)  # fmt: skip
        job = await job_queue.claim(self.db, "tester", 60, 3)
        assert job is not None and job.id == job_id
        version = await job_queue.reserve_version(self.db, job.id, "tester")
        event = build_release(
            model=MODEL, version=version, parent_version=job.parent_version, base_model="tiny",
            uri=f"s3://bucket/{MODEL}/{version}/", files={"adapter_model.safetensors": "0" * 64}, size_bytes=1,
            lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), ewc_lambda=0.0, window=None, metrics={},
            reason="threshold", now=datetime.now(UTC), signer=Signer(hmac_key=KEY),
        )  # fmt: skip
        canary = await canary_for(self.settings, self.db, MODEL, version)
        topic = self.settings.kafka.released_topic
        await job_queue.release(self.db, job.id, "tester", event, topic, Signer(hmac_key=KEY), canary)
        return version

    async def feedback(self, version: str, events: int, negative_rate: float, users: int = 40, **extra: Any) -> None:
        """``events`` thumbs naming ``version``, negative at ``negative_rate`` (exactly, spread at random),
        from ``users`` users in turn, through the ingest pipeline."""
        negatives = set(random.Random(f"{version}-{self.offset}").sample(range(events), round(events * negative_rate)))
        records = []
        for i in range(events):
            n = self.offset + i
            kind = "thumbs_down" if i in negatives else "thumbs_up"
            fields = {"adapter_version": version, "kind": kind, "user_id": f"user-{i % users}", **extra}
            records.append(RawRecord("feedback", 0, n, None, feedback(n, **fields), []))
        self.offset += events
        await self.pipeline.process(records)

    async def outbox(self, topic: str) -> list[dict[str, Any]]:
        rows = await self.db.fetch("SELECT value FROM outbox WHERE topic = $1 ORDER BY id", topic)
        return [r["value"] for r in rows]

    async def judge(self) -> Any:
        return await judge_once(self.settings, self.db, Signer(hmac_key=KEY))

    async def stage(self, version: str) -> str:
        query = "SELECT stage FROM adapters WHERE model = $1 AND version = $2"
        return str(await self.db.fetchval(query, MODEL, version))


@pytest_asyncio.fixture
async def line(make_settings) -> AsyncIterator[Line]:  # type: ignore[no-untyped-def]
    settings = make_settings(
        signing_key=KEY,
        rollout={"canary_fraction": 0.34, "min_events": 150, "max_user_share": 0.05, "max_regression": 0.05},
        window={"max_samples": 100_000},
    )
    db = await Database.connect(settings.database)
    producer = await start_producer(settings.kafka)
    try:
        yield Line(settings, db, IngestPipeline(settings, db, producer))
    finally:
        await producer.stop()
        await db.close()


async def _on_trial(line: Line) -> tuple[str, str]:
    """A line with production v1.0 (released before any node reported) and v1.1 on trial on its canary."""
    assert await line.release() == "v1.0"  # no live node: straight to production
    for node in NODES:
        await line.node(node)
    assert await line.release() == "v1.1"
    return "v1.0", "v1.1"


async def test_a_release_goes_on_trial_on_the_canary_nodes_only(line: Line) -> None:
    production, canary = await _on_trial(line)
    kafka = line.settings.kafka
    assert await registry.alias(line.db, MODEL, "production") == production
    assert await registry.alias(line.db, MODEL, "canary") == canary
    assert (await line.stage(production), await line.stage(canary)) == ("production", "canary")
    trial = await rollouts.of_version(line.db, MODEL, canary)
    assert trial is not None and trial.state == "running" and trial.production_version == production
    assert len(trial.canary_nodes) == 1 and set(trial.canary_nodes) < set(NODES)
    # Through the relay: adapter.released still carries production only; adapter.canary names the canary nodes.
    producer = await start_producer(kafka)
    try:
        while await relay_once(line.db, producer):
            pass
    finally:
        await producer.stop()
    records = await read_all(kafka.bootstrap_servers, kafka.released_topic)
    released = [AdapterReleased.model_validate_json(r.value) for r in records]
    assert [e.version for e in released] == [production]
    records = await read_all(kafka.bootstrap_servers, kafka.canary_topic)
    assert len(records) == 1 and records[0].key == MODEL.encode()
    record = AdapterCanary.model_validate_json(records[0].value)
    assert (record.stage, record.version, record.canary_nodes, record.production_version) == (
        "canary", canary, trial.canary_nodes, production
    )  # fmt: skip
    assert record.sequence is not None and released[0].sequence is not None and record.sequence > released[0].sequence
    assert signature_valid(record.model_dump(mode="json"), KEY)


async def test_canaries_off_or_no_live_node_release_to_production(line: Line, make_settings) -> None:  # type: ignore[no-untyped-def]
    assert await line.release() == "v1.0"
    for node in NODES:
        await line.node(node, canary=False)  # nodes that take no part in canaries
    assert await canary_for(line.settings, line.db, MODEL, "v1.1") is None
    for node in NODES:
        await line.node(node)
    off = make_settings(rollout={"canary_fraction": 0.0})
    assert await canary_for(off, line.db, MODEL, "v1.1") is None
    silent = make_settings(rollout={"canary_fraction": 0.34, "node_timeout_s": 0.001})
    await asyncio.sleep(0.01)
    assert await canary_for(silent, line.db, MODEL, "v1.1") is None
    assert await canary_for(line.settings, line.db, MODEL, "v1.1") is not None


async def test_a_worse_canary_is_rolled_back_once_with_its_numbers(line: Line) -> None:
    production, canary = await _on_trial(line)
    await line.feedback(production, 300, 0.10)
    await line.feedback(canary, 300, 0.30)
    first, second = await asyncio.gather(line.judge(), line.judge())  # two judges at once: one decision
    decisions = [d for d in (first, second) if d is not None]
    assert len(decisions) == 1 and decisions[0].action is Action.ROLLBACK and decisions[0].rule is Rule.REGRESSION
    assert await line.judge() is None  # nothing runs any more
    assert await registry.alias(line.db, MODEL, "production") == production
    assert await registry.alias(line.db, MODEL, "canary") is None
    assert await line.stage(canary) == "rolled_back"
    trial = await rollouts.of_version(line.db, MODEL, canary)
    assert trial is not None and trial.state == "rolled_back" and trial.decided_at is not None
    assert trial.decision is not None and trial.decision["rule"] == "regression" and trial.decision["by"] == "engine"
    canary_side = trial.decision["canary"]
    assert canary_side["events"] == 300 and canary_side["negative_share"] == pytest.approx(0.3)
    assert trial.decision["production"]["negative_share"] == pytest.approx(0.1)
    assert trial.decision["prob_worse"] >= 0.95
    ended = [r for r in await line.outbox(line.settings.kafka.canary_topic) if r["stage"] == "ended"]
    assert len(ended) == 1 and ended[0]["outcome"] == "rolled_back" and ended[0]["production_version"] == production
    assert [r["version"] for r in await line.outbox(line.settings.kafka.released_topic)] == [production]


async def test_an_equal_canary_is_promoted_after_min_events(line: Line) -> None:
    production, canary = await _on_trial(line)
    await line.feedback(production, 300, 0.10)
    await line.feedback(canary, 100, 0.10)
    waiting = await line.judge()
    assert waiting.action is Action.WAIT and "150 events on each side" in waiting.reason
    trial = await rollouts.of_version(line.db, MODEL, canary)
    assert trial is not None and trial.state == "running" and trial.decision is not None  # the latest numbers
    await line.feedback(canary, 400, 0.10)
    decision = await line.judge()
    assert decision.action is Action.PROMOTE and decision.rule is Rule.NOT_WORSE
    assert await registry.alias(line.db, MODEL, "production") == canary
    assert await registry.alias(line.db, MODEL, "previous") == production
    assert await registry.alias(line.db, MODEL, "canary") is None
    assert await line.stage(canary) == "production"
    released = await line.outbox(line.settings.kafka.released_topic)
    assert [r["version"] for r in released] == [production, canary]
    assert released[1]["reason"] == "threshold"  # the reason it was released for: v1 subscribers take it
    assert signature_valid(released[1], KEY)
    ended = [r for r in await line.outbox(line.settings.kafka.canary_topic) if r["stage"] == "ended"]
    assert len(ended) == 1 and ended[0]["outcome"] == "promoted" and ended[0]["sequence"] > released[1]["sequence"]


async def test_production_feedback_before_the_trial_does_not_count(line: Line) -> None:
    assert await line.release() == "v1.0"
    await line.feedback("v1.0", 400, 0.0)  # before any canary: not production's side of the trial
    assert await line.db.fetchval("SELECT count(*) FROM rollout_outcomes") == 0  # nothing to judge: not kept
    for node in NODES:
        await line.node(node)
    assert await line.release() == "v1.1"
    await line.feedback("v1.1", 200, 0.10)
    decision = await line.judge()
    assert decision.action is Action.WAIT and decision.production.events == 0


async def test_a_node_that_fails_to_load_the_canary_rolls_it_back(line: Line) -> None:
    _, canary = await _on_trial(line)
    trial = await rollouts.of_version(line.db, MODEL, canary)
    assert trial is not None
    other = next(n for n in NODES if n not in trial.canary_nodes)
    await line.node(other, "failed", canary)  # not a canary node: does not count
    assert (await line.judge()).action is Action.WAIT
    await line.node(trial.canary_nodes[0], "failed", canary)
    decision = await line.judge()
    assert decision.action is Action.ROLLBACK and decision.rule is Rule.FAILED_NODES and decision.failed_nodes == 1
    assert await line.stage(canary) == "rolled_back"


async def test_unknown_versions_are_counted_apart_and_judge_nothing(line: Line) -> None:
    production, canary = await _on_trial(line)
    await line.feedback("v9.9", 50, 1.0)  # not released
    await line.feedback("v1.2", 30, 1.0)  # not released yet: still unknown once v1.2 exists
    await line.feedback(canary, 40, 0.0, model="other-line")  # another line: rejected by ingest, not counted
    await line.feedback(production, 200, 0.10)
    assert await rollouts.unjudged_counts(line.db, MODEL) == {"v1.2": 30, "v9.9": 50}
    decision = await line.judge()
    assert decision.canary.events == 0 and decision.production.events == 200


async def test_replayed_events_are_counted_once(line: Line) -> None:
    production, _ = await _on_trial(line)
    await line.feedback(production, 100, 0.2)
    line.offset = 0
    await line.feedback(production, 100, 0.2)  # the same event ids again (a consumer restart)
    assert (await line.judge()).production.events == 100


async def test_one_user_cannot_decide_a_rollout(line: Line) -> None:
    production, canary = await _on_trial(line)
    await line.feedback(production, 300, 0.10)
    await line.feedback(canary, 300, 0.10)
    await line.feedback(canary, 3000, 1.0, users=1)  # one user floods the canary with thumbs down
    decision = await line.judge()
    assert decision.canary.events == 3300 and decision.canary.negatives == 3030
    assert decision.action is not Action.ROLLBACK
    assert decision.canary.negative_share is not None and decision.canary.negative_share < 0.2


async def test_jobs_wait_while_a_canary_runs_then_train_from_production(line: Line) -> None:
    _, canary = await _on_trial(line)
    await line.db.execute("INSERT INTO windows (model, state) VALUES ($1, 'closed')", MODEL)
    window = await line.db.fetchval("SELECT max(id) FROM windows WHERE model = $1", MODEL)
    job_id = await line.db.fetchval("INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'threshold')"
                                    " RETURNING id", MODEL, window)  # fmt: skip
    assert await job_queue.claim(line.db, "tester", 60, 3) is None
    await rollouts.decide_by_hand(line.db, MODEL, "promote", policy_of(line.settings.rollout), "t", None)
    job = await job_queue.claim(line.db, "tester", 60, 3)
    assert job is not None and job.id == job_id and job.parent_version == canary


async def test_a_manual_deploy_or_rollback_aborts_the_canary(line: Line) -> None:
    production, canary = await _on_trial(line)
    topic = line.settings.kafka.released_topic
    await registry.deploy(line.db, MODEL, canary, topic, None)  # the canary itself, by hand
    trial = await rollouts.of_version(line.db, MODEL, canary)
    assert trial is not None and trial.state == "aborted" and trial.decision is not None
    assert f"manual deploy of {canary}" in trial.decision["reason"]
    assert await registry.alias(line.db, MODEL, "canary") is None and await line.stage(canary) == "production"
    ended = [r for r in await line.outbox(line.settings.kafka.canary_topic) if r["stage"] == "ended"]
    assert [r["outcome"] for r in ended] == ["aborted"]
    assert await line.release() == "v1.2"  # the next release goes on trial again ...
    await registry.rollback(line.db, MODEL, topic, None)  # ... and a rollback ends it too
    assert (await rollouts.of_version(line.db, MODEL, "v1.2")).state == "aborted"  # type: ignore[union-attr]
    assert await registry.alias(line.db, MODEL, "production") == production
    assert (await line.stage("v1.2"), await line.stage(canary)) == ("rolled_back", "production")
    with pytest.raises(Conflict, match="no canary on trial"):
        await rollouts.decide_by_hand(line.db, MODEL, "abort", policy_of(line.settings.rollout), topic, None)


async def test_promote_and_abort_through_the_api_need_the_token(line: Line, make_settings) -> None:  # type: ignore[no-untyped-def]
    from streamengine.api.app import create_app
    from streamengine.api.context import EngineContext

    production, canary = await _on_trial(line)
    settings = make_settings(api={"token": "rollout-test-token-1234"}, signing_key=KEY)
    ctx = EngineContext(settings, line.db, None, producer=None, reads=line.db)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        refused = await http.post("/adapters/promote")
        assert refused.status_code == 401
        token = {"Authorization": "Bearer rollout-test-token-1234"}
        info = (await http.get("/adapters/canary", headers=token)).json()
        assert (info["version"], info["stage"], info["rollout"]["state"]) == (canary, "canary", "running")
        promoted = await http.post("/adapters/promote", headers=token)
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["state"] == "promoted" and promoted.json()["decision"]["by"] == "operator"
        info = (await http.get(f"/adapters/{canary}", headers=token)).json()
        assert info["stage"] == "production" and info["rollout"]["decision"]["rule"] == "manual"
        assert (await http.post("/adapters/abort", headers=token)).status_code == 409
        status = (await http.get("/training/status", headers=token)).json()
        assert status["production"] == canary and status["canary"] is None
    assert json.loads(json.dumps(info))["rollout"]["production_version"] == production


async def test_a_judge_killed_mid_decision_leaves_nothing_and_the_next_one_decides_once(line: Line) -> None:
    """The judge's connection dies (as when the engine is SIGKILLed) after it moved the aliases, while it waits to
    queue the records: none of it stays, and the next judge takes the decision exactly once."""
    production, canary = await _on_trial(line)
    await line.feedback(production, 300, 0.10)
    await line.feedback(canary, 500, 0.10)
    blocker = await line.db.connect_one()
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")  # the judge's INSERT waits here
            judging = asyncio.create_task(line.judge())
            query = "SELECT pid FROM pg_locks WHERE NOT granted AND relation = 'outbox'::regclass"
            for _ in range(200):
                pid = await blocker.fetchval(query)
                if pid is not None:
                    break
                await asyncio.sleep(0.05)
            assert pid is not None, "the judge never reached the outbox"
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(Exception):  # noqa: B017 - the connection is gone, whatever asyncpg calls it
                await judging
    finally:
        await blocker.close()
    assert await registry.alias(line.db, MODEL, "production") == production
    assert await registry.alias(line.db, MODEL, "canary") == canary
    assert (await rollouts.of_version(line.db, MODEL, canary)).state == "running"  # type: ignore[union-attr]
    assert [r["version"] for r in await line.outbox(line.settings.kafka.released_topic)] == [production]
    assert (await line.judge()).action is Action.PROMOTE
    assert await line.judge() is None
    assert await registry.alias(line.db, MODEL, "production") == canary
    released = [r["version"] for r in await line.outbox(line.settings.kafka.released_topic)]
    assert released == [production, canary]
    ended = [r for r in await line.outbox(line.settings.kafka.canary_topic) if r["stage"] == "ended"]
    assert len(ended) == 1 and ended[0]["outcome"] == "promoted"


async def test_forgetting_a_user_drops_their_outcome_counts(line: Line) -> None:
    from streamengine.store import privacy

    production, _ = await _on_trial(line)
    await line.feedback(production, 100, 0.2, users=4)
    await privacy.forget_user(line.db, "user-0")
    decision = await line.judge()
    assert decision.production.events == 75 and decision.production.contributors == 3
    stored = await line.db.fetch("SELECT DISTINCT contributor FROM rollout_outcomes")
    assert all(len(r["contributor"]) == 64 and not r["contributor"].startswith("user") for r in stored)


async def test_cli_shows_the_trial_and_promotes_or_aborts_it(line: Line) -> None:
    """`streamengine status`, `adapters info canary|list`, `adapters abort` and `adapters promote` against a
    live admin API; a queued job says why it waits."""
    import contextlib

    import uvicorn
    from click.testing import CliRunner

    from streamengine.api.app import create_app
    from streamengine.api.context import EngineContext
    from streamengine.cli.main import cli
    from streamengine.local.embedded import free_port
    from tests.polling import wait_for

    production, canary = await _on_trial(line)
    await line.db.execute("INSERT INTO windows (model, state) VALUES ($1, 'closed')", MODEL)
    window = await line.db.fetchval("SELECT max(id) FROM windows WHERE model = $1", MODEL)
    await line.db.execute("INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'manual')", MODEL, window)
    await line.feedback(production, 200, 0.1)
    await line.feedback(canary, 100, 0.1)
    await line.judge()
    ctx = EngineContext(line.settings, line.db, None, None, reads=line.db)  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))  # fmt: skip
    task = asyncio.create_task(server.serve())
    env = {"STREAMENGINE_API__URL": f"http://127.0.0.1:{port}", "COLUMNS": "200", "NO_COLOR": "1"}

    async def run(*args: str, code: int = 0) -> str:
        result = await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    try:
        await wait_for(lambda: server.started, 30, interval_s=0.02)
        status = await run("status")
        assert f"canary {canary} on trial" in status and f"waits for the canary {canary}" in status
        info = await run("adapters", "info", "canary")
        assert "stage: canary" in info and f"canary: running against {production}" in info
        assert "canary: 100 events" in info and "production: 200 events" in info and "negative share 10.0%" in info
        assert "canary" in await run("adapters", "list")
        assert f"canary {canary} aborted; production stays {production}" in await run("adapters", "abort")
        assert "no canary on trial" in await run("adapters", "promote", code=5)
        info = await run("adapters", "info", canary)
        assert "stage: rolled_back" in info and "decision: abort (manual, by operator)" in info
        waited = await job_queue.claim(line.db, "tester", 60, 3)  # the job that waited trains from production
        assert waited is not None and waited.reason == "manual" and waited.parent_version == production
        await job_queue.finish_unreleased(line.db, waited.id, "tester", "failed", "not trained here")
        assert await line.release() == "v1.2"
        promoted = json.loads(await run("adapters", "promote", "--json"))
        assert (promoted["version"], promoted["state"]) == ("v1.2", "promoted")
        assert await registry.alias(line.db, MODEL, "production") == "v1.2"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


async def test_the_canary_gauges_follow_the_trial(line: Line) -> None:
    from prometheus_client import REGISTRY

    from streamengine.jobs.rollout import refresh_gauges

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(f"streamengine_{name}", {"model": MODEL, **labels})

    production, canary = await _on_trial(line)
    await line.feedback(production, 300, 0.10)
    await line.feedback(canary, 100, 0.20)
    await line.judge()
    await refresh_gauges(line.db, MODEL)
    assert value("canary_running_seconds", version=canary) is not None
    assert value("canary_events", side="canary", version=canary) == pytest.approx(100)
    assert value("canary_negative_share", side="production", version=production) == pytest.approx(0.1)
    assert 0 < (value("canary_prob_worse", version=canary) or 0) < 1
    await line.feedback(canary, 300, 0.30)
    await line.judge()
    await refresh_gauges(line.db, MODEL)
    assert value("canary_trials_ended", state="rolled_back", rule="regression") == 1
    assert value("canary_running_seconds", version=canary) is None
    assert value("canary_events", side="canary", version=canary) is None


@pytest.mark.parametrize("action", ["rollback", "promote"])
async def test_an_undecided_canary_times_out_with_the_configured_action(line: Line, action: str) -> None:
    from datetime import timedelta

    production, canary = await _on_trial(line)
    rollout = line.settings.rollout.model_copy(update={"max_duration": timedelta(seconds=1), "timeout_action": action})
    line.settings = line.settings.model_copy(update={"rollout": rollout})
    assert (await line.judge()).action is Action.WAIT
    await asyncio.sleep(1.1)
    decision = await line.judge()
    assert decision.rule is Rule.TIMEOUT and decision.action is Action(action)
    expected = canary if action == "promote" else production
    assert await registry.alias(line.db, MODEL, "production") == expected
    assert (await rollouts.of_version(line.db, MODEL, canary)).decision["rule"] == "timeout"  # type: ignore[union-attr]
