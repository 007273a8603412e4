"""Serving nodes in canaries (adapter.canary) and their status records (adapter.status), against the real broker
and S3 server: a named node runs the canary and returns to production when it ends, other nodes and nodes
that take no part in canaries stay on production, replayed records are refused, and every change and
heartbeat reaches adapter.status."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from streamengine.contract.events import STATUS_TYPE, NodeStatus
from streamengine.core.release import sequenced
from streamengine.serving import CallbackSwapper, Subscriber
from tests.fleet_tools import KEY, SIGNER, Line, replayed, tamper
from tests.kafka_tools import read_all
from tests.polling import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def model_name() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


async def _next(sub: Subscriber, seen: int, within_s: float = 20) -> Any:
    await sub.wait_until(lambda: len(sub.outcomes) > seen, within_s)
    return sub.outcomes[-1]


async def test_named_node_runs_the_canary_others_stay_and_a_rollback_returns_it(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    base = make_settings(signing_key=KEY)
    line = Line(base, model_name, tmp_path / "adapters")
    v10 = line.release("v1.0")
    await line.publish(v10)

    def settings(node: str, **serving: Any) -> Any:
        return make_settings(signing_key=KEY, serving={"node_id": node, "download_dir": tmp_path / node, **serving})

    calls: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def recorder(name: str) -> CallbackSwapper:
        return CallbackSwapper(lambda model, version, folder: calls[name].append(version))

    a = Subscriber(settings("node-a"), recorder("a"), model_name)
    b = Subscriber(settings("node-b"), recorder("b"), model_name)
    c = Subscriber(settings("node-c", canary=False), recorder("c"), model_name)  # takes no part in canaries
    async with a, b, c:
        assert (a.current, b.current, c.current) == ("v1.0", "v1.0", "v1.0")
        assert c.topics == [base.kafka.released_topic]

        v11 = line.release("v1.1")  # uploaded, numbered; announced only as a canary
        trial = line.canary(v11, "canary", ["node-a", "node-x"])
        seen_a, seen_b = len(a.outcomes), len(b.outcomes)
        await line.publish(trial)
        outcome = await _next(a, seen_a)
        assert (outcome.version, outcome.status, outcome.reason) == ("v1.1", "swapped", "canary")
        assert (a.current, a.stage) == ("v1.1", "canary")
        outcome = await _next(b, seen_b)
        assert (outcome.version, outcome.status, outcome.reason) == ("v1.1", "ignored", "not_named")
        assert (b.current, b.stage) == ("v1.0", "production")
        current = json.loads((a.download_dir / "current.json").read_text())
        assert (current["version"], current["stage"], current["floors"]) == (
            "v1.1", "canary", {"production": [1, "v1.0"], "canary": [trial.sequence, "v1.1"]}
        )  # fmt: skip

        # The rollback's ended record is newer than the canary: back to v1.0, whose release is older (seq 1).
        seen_a = len(a.outcomes)
        await line.publish(line.canary(v11, "ended", ["node-a", "node-x"], outcome="rolled_back"))
        outcome = await _next(a, seen_a)
        assert (outcome.version, outcome.status) == ("v1.0", "swapped")
        assert (a.current, a.stage) == ("v1.0", "production")

        # The old canary record sent again (fresh event id, same signed fields) is refused: the node stays.
        seen_a = len(a.outcomes)
        await line.publish(replayed(trial), topic=base.kafka.canary_topic)
        outcome = await _next(a, seen_a)
        assert (outcome.version, outcome.status, outcome.reason) == ("v1.1", "failed", "stale")
        assert "not newer than v1.1" in outcome.detail and a.current == "v1.0"
        # The production release sent again changes nothing.
        seen_a = len(a.outcomes)
        await line.publish(replayed(v10))
        assert (await _next(a, seen_a)).reason == "duplicate" and a.current == "v1.0"
        # A forged canary record (not signed with the fleet's key) moves nothing.
        forged = trial.model_copy(update={"sequence": 99, "event_id": str(uuid.uuid4())})
        seen_a = len(a.outcomes)
        await line.publish(forged)
        assert (await _next(a, seen_a)).reason == "signature" and a.current == "v1.0"

    assert calls == {"a": ["v1.0", "v1.1", "v1.0"], "b": ["v1.0"], "c": ["v1.0"]}
    assert not any(o.version == "v1.1" for o in c.outcomes)  # never read adapter.canary

    # Compaction may leave only the replayed canary record: a restarted node still refuses it (current.json).
    compacted = settings("node-a", canary=True).model_copy(
        update={"kafka": base.kafka.model_copy(update={"canary_topic": f"compacted-{uuid.uuid4().hex}"})}
    )
    await line.publish(replayed(trial), topic=compacted.kafka.canary_topic)
    async with Subscriber(compacted, recorder("a"), model_name) as restarted:
        assert (restarted.current, restarted.stage) == ("v1.0", "production")
        assert any((o.version, o.reason) == ("v1.1", "stale") for o in restarted.outcomes)


async def test_promotion_keeps_the_canary_node_on_the_version_and_moves_the_rest(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    line = Line(make_settings(signing_key=KEY), model_name, tmp_path / "adapters")
    v10 = line.release("v1.0")
    await line.publish(v10)
    calls: dict[str, list[str]] = {"a": [], "b": []}

    def node(name: str) -> Subscriber:
        settings = make_settings(signing_key=KEY, serving={"node_id": f"node-{name}", "download_dir": tmp_path / name})
        return Subscriber(settings, CallbackSwapper(lambda m, v, f: calls[name].append(v)), model_name)

    async with node("a") as a, node("b") as b:
        v11 = line.release("v1.1")
        await line.publish(line.canary(v11, "canary", ["node-a"]))
        await a.wait_for_version("v1.1")
        # The end of the trial may arrive before the release that makes v1.1 production: no step back.
        await line.publish(line.canary(v11, "ended", ["node-a"], outcome="promoted"))
        await a.wait_until(lambda: a.stage == "production")
        await line.publish(sequenced(v11, line.sequence + 1, SIGNER))
        await b.wait_for_version("v1.1")
        await a.wait_until(lambda: a.outcomes[-1].reason == "duplicate")
        assert (a.current, a.stage) == ("v1.1", "production")
    assert calls == {"a": ["v1.0", "v1.1"], "b": ["v1.0", "v1.1"]}


async def _statuses(settings: Any) -> list[tuple[str, NodeStatus, dict[str, bytes]]]:
    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.status_topic)
    return [(r.key.decode(), NodeStatus.model_validate_json(r.value), dict(r.headers)) for r in records if r.value]


async def test_status_records_on_every_change_and_as_heartbeat(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    settings = make_settings(
        signing_key=KEY, serving={"node_id": "node-a", "download_dir": tmp_path / "a", "status_interval_s": 0.5}
    )
    line = Line(settings, model_name, tmp_path / "adapters")
    v10 = line.release("v1.0")
    await line.publish(v10)
    async with Subscriber(settings, CallbackSwapper(lambda *_: None), model_name) as sub:
        began = datetime.now(UTC)
        v11 = line.release("v1.1")
        tamper(line.fleet, "v1.1")
        await line.publish(line.canary(v11, "canary", ["node-a"]))
        await sub.wait_until(lambda: sub.outcomes[-1].reason == "integrity")
        assert sub.current == "v1.0"
        failed: list[NodeStatus] = []

        async def failed_reported() -> bool:
            failed[:] = [s for _, s, _ in await _statuses(settings) if s.state == "failed"]
            return bool(failed)

        await wait_for(failed_reported, 20)
        status = failed[-1]
        assert (status.version, status.stage, status.target_version) == ("v1.0", "canary", "v1.1")
        assert status.reason is not None and status.reason.startswith("integrity:")

        async def heartbeats() -> bool:
            later = [s for _, s, _ in await _statuses(settings) if s.heartbeat_at > began and s.state == "failed"]
            return len(later) >= 3  # the failed state repeats every 0.5 s

        await wait_for(heartbeats, 20)

    everything = await read_all(settings.kafka.bootstrap_servers, settings.kafka.status_topic)
    last = everything[-1]  # a clean stop leaves the fleet: a tombstone on the node's key
    assert (last.key, last.value) == (f"{model_name}/node-a".encode(), None)
    records = await _statuses(settings)
    assert {key for key, _, _ in records} == {f"{model_name}/node-a"}
    states = [(s.version, s.stage, str(s.state), s.target_version) for _, s, _ in records]
    assert states[0] == ("v1.0", "production", "serving", None)  # the first record follows the bootstrap
    assert ("v1.0", "canary", "downloading", "v1.1") in states
    assert states.index(("v1.0", "canary", "downloading", "v1.1")) < states.index(("v1.0", "canary", "failed", "v1.1"))
    headers = records[0][2]
    assert headers["ce_type"] == STATUS_TYPE.encode() and headers["ce_specversion"] == b"1.0"
    assert all(s.swapped_at is not None for _, s, _ in records)
