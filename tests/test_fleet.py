"""The engine's fleet view on the real broker, PostgreSQL and S3 server: serving nodes' adapter.status records
stored by the running engine, malformed records skipped, a node that stops cleanly removed, one that dies
flagged silent after rollout.node_timeout_s,
a failed canary load counted, GET /fleet, the fleet gauges and `streamengine status`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from streamengine.contract.events import NodeStatus
from streamengine.serving import CallbackSwapper, Subscriber
from tests.engine_tools import engine_running, metric
from tests.fleet_tools import Line, tamper
from tests.polling import wait_for

pytestmark = pytest.mark.integration


async def _send(settings: Any, *records: tuple[bytes | None, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.kafka.status_topic, value=value, key=key)
    finally:
        await producer.stop()


async def _live(line: Any, count: int) -> bool:
    return bool((await line())["live"] == count)


async def _node_ids(line: Any, ids: set[str]) -> bool:
    return {n["node_id"] for n in (await line())["nodes"]} == ids


async def test_engine_stores_the_fleet_flags_silent_and_failed_nodes_and_survives_bad_records(
    make_settings: Any, tmp_path: Path
) -> None:
    model = f"fleet-{uuid.uuid4().hex[:8]}"
    settings = make_settings(signing_key="fleet-key", model={"name": model}, rollout={"node_timeout_s": 3.0})
    line = Line(settings, model, tmp_path / "adapters")
    await line.publish(line.release("v1.0"))

    def node(name: str, interval_s: float) -> Subscriber:
        serving = {"node_id": name, "download_dir": tmp_path / name, "status_interval_s": interval_s}
        return Subscriber(
            make_settings(signing_key="fleet-key", serving=serving), CallbackSwapper(lambda *_: None), model
        )

    async with engine_running(settings) as api:
        invalid_before = await metric(api, "streamengine_fleet_status_records_total", outcome="invalid") or 0.0
        stale = NodeStatus(
            node_id="node-a", model=model, stage="production", state="serving",  # type: ignore[arg-type]
            heartbeat_at=datetime.now(UTC) - timedelta(hours=1),
        )  # fmt: skip
        await _send(
            settings,
            (f"{model}/node-x".encode(), b"{not json"),
            (f"{model}/someone-else".encode(), stale.model_dump_json().encode()),  # key and node differ
            (f"{model}/node-x".encode(), json.dumps({"node_id": "node-x", "model": model}).encode()),  # fields missing
            (f"{model}/node-x".encode(), None),  # a tombstone
        )
        async with node("node-a", 0.3) as a:

            async def entry_now() -> dict[str, Any]:
                lines = (await api.get("/fleet", params={"model": model})).json()["lines"]
                return lines[0] if lines else {"live": 0, "nodes": []}

            async with node("node-b", 0.3):
                await wait_for(lambda: _live(entry_now, 2), 30)
            # node-b stopped cleanly: its tombstone removes it. node-c sends one record and dies.
            await wait_for(lambda: _node_ids(entry_now, {"node-a"}), 30)
            alive = NodeStatus(
                node_id="node-c", model=model, stage="production", state="serving",  # type: ignore[arg-type]
                heartbeat_at=datetime.now(UTC),
            )  # fmt: skip
            await _send(settings, (f"{model}/node-c".encode(), alive.model_dump_json().encode()))
            await wait_for(lambda: _live(entry_now, 2), 30)
            await asyncio.sleep(3.5)  # past rollout.node_timeout_s for node-c
            fleet = (await api.get("/fleet")).json()
            assert fleet["node_timeout_s"] == 3.0
            (entry,) = [entry for entry in fleet["lines"] if entry["model"] == model]
            assert (entry["live"], entry["silent"], entry["failed"]) == (1, 1, 0)
            assert entry["versions"] == [{"version": "v1.0", "stage": "production", "nodes": 1}]
            nodes = {n["node_id"]: n for n in entry["nodes"]}
            assert set(nodes) == {"node-a", "node-c"}  # nothing of node-x or of the malformed records
            assert nodes["node-c"]["silent"] and not nodes["node-a"]["silent"]
            assert (nodes["node-a"]["version"], nodes["node-a"]["state"]) == ("v1.0", "serving")
            assert nodes["node-a"]["swapped_at"] is not None
            labels = {"model": model, "version": "v1.0", "stage": "production", "state": "serving"}
            assert await metric(api, "streamengine_fleet_nodes", **labels) == 1
            assert await metric(api, "streamengine_fleet_silent_nodes", model=model) == 1
            invalid = await metric(api, "streamengine_fleet_status_records_total", outcome="invalid")
            assert invalid == invalid_before + 3

            # A canary node-a cannot load (tampered files) shows as failed, with the version, against the canary.
            v11 = line.release("v1.1")
            tamper(line.fleet, "v1.1")
            await line.publish(line.canary(v11, "canary", ["node-a"]))

            async def failed() -> dict[str, Any] | None:
                (entry,) = (await api.get("/fleet", params={"model": model})).json()["lines"]
                return entry if entry["failed"] == 1 else None

            entry = await wait_for(failed, 30)
            (node_a,) = [n for n in entry["nodes"] if n["node_id"] == "node-a"]
            assert (node_a["version"], node_a["stage"], node_a["state"], node_a["target_version"]) == (
                "v1.0", "canary", "failed", "v1.1"
            )  # fmt: skip
            assert node_a["reason"].startswith("integrity:") and a.current == "v1.0"
            assert await metric(api, "streamengine_fleet_failed_nodes", model=model, target_version="v1.1") == 1
            assert (await api.get("/health")).status_code == 200  # the status consumer is still running

            from streamengine.cli.main import cli

            env = {"STREAMENGINE_API__URL": settings.api.base_url(), "COLUMNS": "200"}
            result = await asyncio.to_thread(CliRunner().invoke, cli, ["status", "--model", model], env=env)
            assert result.exit_code == 0, result.output
            assert "fleet" in result.output and "node-a" in result.output and "failed" in result.output
            assert "silent" in result.output
            assert "fleet: 1 live (1 canary v1.0), 1 failed, 1 silent" in result.output
            top = await asyncio.to_thread(CliRunner().invoke, cli, ["top", "--once"], env=env)
            assert top.exit_code == 0, top.output
            assert f"fleet\n  {model}: 1 live (1 canary v1.0), 1 failed, 1 silent" in top.output, top.output
