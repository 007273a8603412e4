"""The whole loop on the real broker, PostgreSQL and S3 server: a running engine (ingest, outbox relay, canary judge,
fleet status consumer), four subscribers with the tiny model in process (PEFT swappers; three that take part in
canaries, one that does not, as a subscriber of an earlier streamengine) reporting on adapter.status, releases
down the worker's release path with real files, and a feedback simulator that answers for each node with thumbs at
a negative rate chosen per version, naming the version that node serves.

(a) a canary worse than production (20% against 10% negative) is rolled back by the engine and its node goes
back to production; (b) an equal canary is promoted and every node moves to it; (c) a canary its node cannot
load is reported failed and rolled back without waiting for feedback; (e) the node that takes no part in
canaries serves production throughout.
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from streamengine.config.keys import release_signer
from streamengine.config.settings import Settings
from streamengine.contract.events import LoraSpec
from streamengine.core.release import build_release
from streamengine.core.rollout import canary_nodes
from streamengine.jobs.worker import canary_for
from streamengine.serving import CallbackSwapper, PeftSwapper, Subscriber
from streamengine.store import fleet as store_fleet
from streamengine.store import job_queue
from streamengine.store.db import Database
from tests.engine_tools import engine_running
from tests.fleet_tools import tamper
from tests.kafka_tools import feedback
from tests.polling import wait_for
from tests.serving_tools import Fleet, make_adapter

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
KEY = "fleet-loop-signing-key-0123456789"
AWARE = ["node-a", "node-b", "node-c"]
OLD = "node-v1"  # takes no part in canaries: never reads adapter.canary
ROUND = {"canary": 60, "production": 20}  # events per node and round, by the side the node is on


async def _release(
    db: Database, settings: Settings, fleet: Fleet, root: Path, damaged: bool = False, adapter: Path | None = None
) -> str:
    """The worker's release step without the training: a claimed job, its version, real files in S3 (``adapter``'s,
    else small stand-ins; with ``damaged``, changed in S3 after their hashes were taken), the canary decision
    (``worker.canary_for``) and ``job_queue.release``."""
    await db.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", MODEL)
    window = await db.fetchval("INSERT INTO windows (model, state) VALUES ($1, 'closed') RETURNING id", MODEL)
    await db.execute("INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'threshold')", MODEL, window)
    job = await job_queue.claim(db, "tester", 60, 3)
    assert job is not None
    version = await job_queue.reserve_version(db, job.id, "tester")
    folder = adapter or root / version
    if adapter is None:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "version": version}))
        (folder / "adapter_model.safetensors").write_bytes(os.urandom(256))
    files = await fleet.store.aupload_folder(folder, MODEL, version)
    if damaged:
        tamper(fleet, version)
    sizes = {name: (folder / name).stat().st_size for name in files}
    signer = release_signer(settings)
    event = build_release(
        model=MODEL, version=version, parent_version=job.parent_version, base_model="tiny",
        uri=fleet.store.uri(MODEL, version), files=files, file_sizes=sizes, size_bytes=sum(sizes.values()),
        lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), ewc_lambda=0.0, window=None, metrics={},
        reason="threshold", now=datetime.now(UTC), signer=signer,
    )  # fmt: skip
    canary = await canary_for(settings, db, MODEL, version)
    await job_queue.release(db, job.id, "tester", event, settings.kafka.released_topic, signer, canary)
    return version


class Simulator:
    """Answers requests on every node and sends the users' thumbs, naming the version that answered; in each
    block of 10 answers of a version exactly ``rate * 10`` are thumbs down, at random places (seeded)."""

    def __init__(self, settings: Settings, rates: dict[str, float]) -> None:
        self.settings, self.rates = settings, rates
        self.sent = 0
        self.random = random.Random(12)

    async def round(self, nodes: dict[str, Subscriber]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            for node_id, node in nodes.items():
                version = node.current
                assert version is not None
                count = ROUND["canary" if node.stage == "canary" else "production"]
                for block in range(0, count, 10):
                    down = set(self.random.sample(range(10), round(self.rates[version] * 10)))
                    for i in range(10):
                        self.sent += 1
                        value = feedback(
                            self.sent, event_id=f"loop-{self.sent}", adapter_version=version,
                            kind="thumbs_down" if i in down else "thumbs_up",
                            user_id=f"{node_id}-user-{(block + i) % 40}",
                        )  # fmt: skip
                        await producer.send(self.settings.kafka.feedback_topic, value=value, key=node_id.encode())
            await producer.flush()
        finally:
            await producer.stop()


async def _until_decided(
    api: httpx.AsyncClient, simulator: Simulator, nodes: dict[str, Subscriber], version: str
) -> Any:
    """Feedback rounds until the engine decided ``version``'s trial; returns the adapter's info."""

    async def decided() -> Any:
        info = (await api.get(f"/adapters/{version}")).json()
        if info["rollout"] and info["rollout"]["state"] != "running":
            return info
        await simulator.round(nodes)
        return None

    return await wait_for(decided, 240, interval_s=1.0)


async def test_the_engine_judges_canaries_on_live_feedback_and_the_fleet_follows(
    make_settings: Any, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        signing_key=KEY,
        rollout={"canary_fraction": 0.34, "min_events": 150, "max_user_share": 0.05, "max_regression": 0.05},
        window={"max_samples": 1_000_000},
    )
    assert canary_nodes(AWARE, MODEL, 0.34) == ["node-c"]  # by hash, among the nodes that take part
    fleet = Fleet(settings, MODEL)
    calls: dict[str, list[str]] = {node: [] for node in [*AWARE, OLD]}

    adapters = [make_adapter(tiny_model, tmp_path / "adapters" / f"a{seed}", seed) for seed in range(3)]

    def node(node_id: str) -> Subscriber:
        """A serving node with the tiny model in process (PEFT), swapping each version in."""
        serving = {"node_id": node_id, "download_dir": tmp_path / node_id, "canary": node_id != OLD}
        return Subscriber(
            make_settings(signing_key=KEY, serving=serving), PeftSwapper(tiny_model), MODEL,
            on_swap=lambda version, n=node_id: calls[n].append(version),
        )  # fmt: skip

    db = await Database.connect(settings.database)
    try:
        async with engine_running(settings) as api:
            v10 = await _release(db, settings, fleet, tmp_path / "files", adapter=adapters[0])
            assert v10 == "v1.0"  # no node yet: production
            nodes = {node_id: node(node_id) for node_id in [*AWARE, OLD]}
            for sub in nodes.values():
                await sub.__aenter__()
            try:

                async def fleet_on(version: str) -> bool:
                    (line,) = (await api.get("/fleet", params={"model": MODEL})).json()["lines"] or [None]
                    return bool(line) and line["versions"] == [{"version": version, "stage": "production", "nodes": 4}]

                await wait_for(lambda: fleet_on("v1.0"), 30)
                # The node with serving.canary off says so in its status: the engine never picks it for a canary.
                (line,) = (await api.get("/fleet", params={"model": MODEL})).json()["lines"]
                assert {n["node_id"]: n["canary"] for n in line["nodes"]} == {**dict.fromkeys(AWARE, True), OLD: False}
                assert sorted(await store_fleet.live_nodes(db, MODEL, settings.rollout.node_timeout_s)) == AWARE

                # (a) v1.1 on trial on node-c, 20% negative against production's 10%: rolled back.
                assert await _release(db, settings, fleet, tmp_path / "files", adapter=adapters[1]) == "v1.1"
                await nodes["node-c"].wait_until(lambda: nodes["node-c"].stage == "canary", 30)
                assert {n: s.current for n, s in nodes.items()} == {**dict.fromkeys(nodes, "v1.0"), "node-c": "v1.1"}
                simulator = Simulator(settings, {"v1.0": 0.1, "v1.1": 0.2})
                info = await _until_decided(api, simulator, nodes, "v1.1")
                assert (info["stage"], info["rollout"]["state"]) == ("rolled_back", "rolled_back"), info
                decision = info["rollout"]["decision"]
                assert decision["rule"] == "regression" and decision["prob_worse"] >= 0.95, decision
                await nodes["node-c"].wait_for_version("v1.0", 30)
                assert nodes["node-c"].stage == "production"
                await wait_for(lambda: fleet_on("v1.0"), 30)
                rolled_back_after = simulator.sent

                # (b) v1.2 on trial, as good as production: promoted, every node on it.
                assert await _release(db, settings, fleet, tmp_path / "files", adapter=adapters[2]) == "v1.2"
                await nodes["node-c"].wait_until(lambda: nodes["node-c"].current == "v1.2", 30)
                simulator.rates = {"v1.0": 0.1, "v1.2": 0.1}
                info = await _until_decided(api, simulator, nodes, "v1.2")
                assert (info["stage"], info["rollout"]["state"]) == ("production", "promoted"), info
                assert info["rollout"]["decision"]["rule"] == "not_worse"
                for sub in nodes.values():
                    await sub.wait_for_version("v1.2", 30)
                await wait_for(lambda: fleet_on("v1.2"), 30)
            finally:
                for sub in nodes.values():
                    await sub.__aexit__(None, None, None)
    finally:
        await db.close()

    # (e) the node that knows nothing of canaries never ran one; the canary node stepped back once, no flapping.
    assert calls[OLD] == ["v1.0", "v1.2"]
    assert calls["node-c"] == ["v1.0", "v1.1", "v1.0", "v1.2"]
    assert calls["node-a"] == calls["node-b"] == ["v1.0", "v1.2"]
    promoted_after = simulator.sent - rolled_back_after
    print(f"\nfeedback events sent until the rollback was seen: {rolled_back_after}; the promotion: {promoted_after}")


async def test_a_canary_its_node_cannot_load_is_rolled_back(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(signing_key=KEY, rollout={"canary_fraction": 0.34}, window={"max_samples": 1_000_000})
    fleet = Fleet(settings, MODEL)

    def node(node_id: str) -> Subscriber:
        serving = {"node_id": node_id, "download_dir": tmp_path / node_id}
        return Subscriber(make_settings(signing_key=KEY, serving=serving), CallbackSwapper(lambda *_: None), MODEL)

    db = await Database.connect(settings.database)
    try:
        async with engine_running(settings) as api:
            assert await _release(db, settings, fleet, tmp_path / "files") == "v1.0"
            async with node("node-a") as a, node("node-b") as b, node("node-c") as c:

                async def live(count: int) -> bool:
                    lines = (await api.get("/fleet", params={"model": MODEL})).json()["lines"]
                    return bool(lines) and lines[0]["live"] == count

                await wait_for(lambda: live(3), 30)
                assert await _release(db, settings, fleet, tmp_path / "files", damaged=True) == "v1.1"

                async def decided() -> Any:
                    info = (await api.get("/adapters/v1.1")).json()
                    return info if info["rollout"] and info["rollout"]["state"] != "running" else None

                info = await wait_for(decided, 60)
                assert info["rollout"]["canary_nodes"] == ["node-c"]
                decision = info["rollout"]["decision"]
                assert (info["stage"], decision["rule"], decision["failed_nodes"]) == ("rolled_back", "failed_nodes", 1)
                assert any((o.version, o.reason) == ("v1.1", "integrity") for o in c.outcomes)
                assert (a.current, b.current, c.current) == ("v1.0", "v1.0", "v1.0")
                await c.wait_until(lambda: c.stage == "production", 30)  # the end of the trial reached the node
    finally:
        await db.close()
