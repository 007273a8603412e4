"""The adapter registry on real PostgreSQL, S3 and Kafka: version numbers, aliases, deploy and rollback
events through the outbox, immutability, deletion and garbage collection, signed releases end to end.

Releases here take the worker's path without the training: a job row is claimed, its version reserved,
the folder uploaded and verified, then registry row, aliases and outbox row are written in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from streamengine.config.settings import Settings
from streamengine.contract.events import RELEASED_TYPE, LoraSpec
from streamengine.core.manifest import Signer, sha256_bytes, signature_valid
from streamengine.core.release import build_release, manifest_of
from streamengine.core.versions import Version, base_changed, next_version
from streamengine.errors import ConfigError, Conflict, NotFound
from streamengine.serving import CallbackSwapper, Subscriber
from streamengine.store import job_queue, registry
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.stream.outbox import relay_once
from streamengine.stream.producer import start_producer
from tests.engine_tools import add_samples
from tests.kafka_tools import read_all
from tests.polling import wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _folder(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "seed": seed}))
    (root / "adapter_model.safetensors").write_bytes(bytes([seed % 256]) * 4096)
    (root / "fisher.safetensors").write_bytes(b"f" * 1024)
    return root


@dataclass
class Line:
    """One model line: settings, database, bucket; ``release`` runs the worker's release path."""

    settings: Settings
    db: Database
    store: ObjectStore
    tmp: Path

    async def job(self, reason: str = "threshold", major: bool = False) -> job_queue.Job:
        await self.db.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", MODEL)
        window = await self.db.fetchval("INSERT INTO windows (model, state) VALUES ($1, 'closed') RETURNING id", MODEL)
        job_id = await self.db.fetchval(
            "INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, $3) RETURNING id", MODEL, window, reason
        )
        if major:
            await job_queue.request_major(self.db, job_id)
        job = await job_queue.claim(self.db, "tester", 60, 3)
        assert job is not None and job.id == job_id
        return job

    async def release(self, seed: int = 0, *, base: str = "tiny", major: bool = False, key: str | None = None) -> str:
        job = await self.job(major=major)
        new_base = await registry.base_model_changed(self.db, MODEL, base)
        version = await job_queue.reserve_version(self.db, job.id, "tester", major=new_base)
        folder = _folder(self.tmp / f"{version}-{seed}", seed)
        signer = Signer(hmac_key=key) if key else None
        files = {p.name: sha256_bytes(p.read_bytes()) for p in sorted(folder.iterdir())}
        event = build_release(
            model=MODEL,
            version=version,
            parent_version=job.parent_version,
            base_model=base,
            uri=self.store.uri(MODEL, version),
            files=files,
            size_bytes=sum(p.stat().st_size for p in folder.iterdir()),
            lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]),
            ewc_lambda=500.0,
            window=None,
            metrics={},
            reason="threshold",
            now=datetime.now(UTC),
            signer=signer,
        )
        (folder / "manifest.json").write_text(json.dumps(manifest_of(event)))
        released = await registry.is_released(self.db, MODEL, version)
        await self.store.aupload_folder(folder, MODEL, version, overwrite=not released)
        await job_queue.release(self.db, job.id, "tester", event, self.settings.kafka.released_topic, signer)
        return version

    async def aliases(self) -> tuple[str | None, str | None]:
        return await registry.alias(self.db, MODEL, "production"), await registry.alias(self.db, MODEL, "previous")

    async def relay(self) -> list[Any]:
        """Publish the outbox through the relay and return every record of the topic."""
        producer = await start_producer(self.settings.kafka)
        try:
            while await relay_once(self.db, producer):
                pass
        finally:
            await producer.stop()
        return await read_all(self.settings.kafka.bootstrap_servers, self.settings.kafka.released_topic)


@pytest_asyncio.fixture
async def line(make_settings, tmp_path: Path) -> AsyncIterator[Line]:  # type: ignore[no-untyped-def]
    settings = make_settings()
    db = await Database.connect(settings.database)
    store = ObjectStore.from_settings(settings.storage, backoff_s=0.05)
    store.ensure_bucket()
    try:
        yield Line(settings, db, store, tmp_path / "folders")
    finally:
        await db.close()


def test_version_numbers_are_pure() -> None:
    assert str(next_version([])) == "v1.0"
    assert str(next_version(["v1.0", "v1.9", "v1.10"])) == "v1.11"
    assert str(next_version(["v1.3", "v2.1"], major=True)) == "v3.0"
    assert Version.parse("v1.10") > Version.parse("v1.9")
    with pytest.raises(ConfigError):
        Version.parse("1.0")
    assert base_changed("org/base-7b", "org/base-8b")
    assert not base_changed("/models/base/", "/models/base")
    assert not base_changed(None, "x") and not base_changed("", "x")


async def test_versions_bump_minor_major_and_aliases_move(line: Line) -> None:
    assert [await line.release(i) for i in range(3)] == ["v1.0", "v1.1", "v1.2"]
    assert await line.aliases() == ("v1.2", "v1.1")
    assert (await registry.get_adapter(line.db, MODEL, "v1.2")).parent_version == "v1.1"
    assert await line.release(3, major=True) == "v2.0"  # `streamengine train --major`
    assert await line.release(4) == "v2.1"
    assert await line.release(5, base="tiny-v2") == "v3.0"  # the base model changed: a new major line
    assert (await registry.get_adapter(line.db, MODEL, "production")).manifest["base_model"] == "tiny-v2"
    assert await line.release(6, base="tiny-v2") == "v3.1"

    await registry.deploy(line.db, MODEL, "v1.1", line.settings.kafka.released_topic, None)
    assert await line.aliases() == ("v1.1", "v3.1")
    await registry.rollback(line.db, MODEL, line.settings.kafka.released_topic, None)
    assert await line.aliases() == ("v3.1", "v1.1")
    assert await line.release(7, base="tiny-v2") == "v3.2"  # numbering follows the highest, not production
    listed = await registry.list_adapters(line.db, MODEL)
    assert [a.version for a in listed][:3] == ["v3.2", "v3.1", "v3.0"] and len(listed) == 8
    assert set(listed[0].aliases) == {"production"} and set(listed[1].aliases) == {"previous"}
    with pytest.raises(NotFound):
        await registry.deploy(line.db, MODEL, "v9.9", line.settings.kafka.released_topic, None)


async def test_deploy_and_rollback_events_reach_the_topic(line: Line) -> None:
    key = "fleet-signing-key"
    for i in range(2):
        await line.release(i, key=key)
    topic = line.settings.kafka.released_topic
    deployed = await registry.deploy(line.db, MODEL, "v1.0", topic, Signer(hmac_key=key))
    rolled = await registry.rollback(line.db, MODEL, topic, Signer(hmac_key=key))
    assert (deployed.reason, rolled.reason, rolled.version) == ("manual", "rollback", "v1.1")

    records = await line.relay()
    values = [json.loads(r.value) for r in records]
    assert [(v["version"], v["reason"]) for v in values] == [
        ("v1.0", "threshold"), ("v1.1", "threshold"), ("v1.0", "manual"), ("v1.1", "rollback")
    ]  # fmt: skip
    assert {r.key for r in records} == {MODEL.encode()}
    assert all(signature_valid(v, key) for v in values)
    assert len({v["event_id"] for v in values}) == 4  # each announcement is its own event
    headers = dict(records[-1].headers)
    assert headers["ce_type"] == RELEASED_TYPE.encode() and headers["ce_id"] == values[-1]["event_id"].encode()
    assert await line.db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

    # A node starting now converges on the latest record (the rollback), verifying the signature...
    calls: list[str] = []
    swapper = CallbackSwapper(lambda m, v, f: calls.append(v))
    async with Subscriber(_with_key(line.settings, key), swapper, MODEL) as sub:
        assert sub.current == "v1.1" and calls == ["v1.1"]
        assert sorted(p.name for p in (sub.download_dir / "v1.1").iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]  # fmt: skip  (fisher.safetensors is for trainers; not downloaded)
    # ...and one holding another key refuses it and serves nothing.
    async with Subscriber(_with_key(line.settings, "not-the-key"), CallbackSwapper(lambda *_: None), MODEL) as sub:
        assert sub.current is None and (sub.outcomes[-1].status, sub.outcomes[-1].reason) == ("failed", "signature")


async def test_unsigned_release_refused_when_a_key_is_configured(line: Line) -> None:
    await line.release(0)  # the trainer has no key
    await line.relay()
    async with Subscriber(_with_key(line.settings, "k"), CallbackSwapper(lambda *_: None), MODEL) as sub:
        assert sub.current is None
        assert "unsigned" in sub.outcomes[-1].detail


def _with_key(settings: Settings, key: str) -> Settings:
    from pydantic import SecretStr

    return settings.model_copy(update={"signing_key": SecretStr(key)})


async def test_released_versions_are_immutable(line: Line, tmp_path: Path) -> None:
    await line.release(0)
    other = _folder(tmp_path / "other", 99)
    (other / "manifest.json").write_text("{}")
    with pytest.raises(Conflict, match="immutable"):
        await line.store.aupload_folder(other, MODEL, "v1.0")
    assert await registry.is_released(line.db, MODEL, "v1.0")
    # A job retrying its own reserved, unreleased version may replace its earlier upload.
    job = await line.job()
    version = await job_queue.reserve_version(line.db, job.id, "tester")
    assert version == "v1.1" and not await registry.is_released(line.db, MODEL, version)
    await line.store.aupload_folder(other, MODEL, version)
    await line.store.aupload_folder(other, MODEL, version, overwrite=True)
    assert await job_queue.reserve_version(line.db, job.id, "tester") == "v1.1"  # kept across retries


async def test_delete_and_garbage_collection_keep_what_is_needed(line: Line) -> None:
    for i in range(5):
        await line.release(i)  # v1.0 .. v1.4; production v1.4, previous v1.3
    db, store = line.db, line.store
    for protected in ("v1.4", "v1.3"):
        with pytest.raises(Conflict, match="alias"):
            await registry.delete_version(db, store, MODEL, protected)
    gone = await registry.delete_version(db, store, MODEL, "v1.0")
    assert gone.deleted == ["v1.0"] and gone.objects == 4
    assert store.list_all_versions(MODEL) == ["v1.1", "v1.2", "v1.3", "v1.4"]
    with pytest.raises(NotFound, match="deleted"):
        await registry.get_adapter(db, MODEL, "v1.0")
    with pytest.raises(Conflict, match="deleted"):
        await registry.deploy(db, MODEL, "v1.0", line.settings.kafka.released_topic, None)

    # A job training on top of v1.1 protects it; a failed upload leaves an orphan folder.
    await registry.deploy(db, MODEL, "v1.1", line.settings.kafka.released_topic, None)  # production v1.1
    await registry.deploy(db, MODEL, "v1.4", line.settings.kafka.released_topic, None)  # previous v1.1
    running = await line.job()
    assert running.parent_version == "v1.4"
    orphan = _folder(line.tmp / "orphan", 7)
    store.upload_folder(orphan, MODEL, "v1.9")  # uploaded, never released (its job failed)

    dry = await registry.collect_garbage(db, store, MODEL, keep=1, dry_run=True)
    assert (dry.deleted, dry.orphans, dry.kept) == (["v1.3", "v1.2"], ["v1.9"], ["v1.4", "v1.1"])
    assert store.list_all_versions(MODEL) == ["v1.1", "v1.2", "v1.3", "v1.4", "v1.9"]
    done = await registry.collect_garbage(db, store, MODEL, keep=1)
    assert (done.deleted, done.orphans) == (["v1.3", "v1.2"], ["v1.9"])
    assert store.list_all_versions(MODEL) == ["v1.1", "v1.4"]
    assert [a.version for a in await registry.list_adapters(db, MODEL)] == ["v1.4", "v1.1"]
    # Deleted numbers are never handed out again.
    assert await job_queue.reserve_version(db, running.id, "tester") == "v1.5"


async def test_admin_api_delete_gc_and_train_major(line: Line) -> None:
    from streamengine.api.app import create_app
    from streamengine.api.context import EngineContext

    for i in range(3):
        await line.release(i)
    ctx = EngineContext(line.settings, line.db, line.store, producer=None, reads=line.db)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(ctx))
    json_type = {"Content-Type": "application/json"}  # no token configured: mutating requests must say JSON
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=json_type) as http:
        refused = await http.delete("/adapters/v1.2")
        assert refused.status_code == 409 and "alias" in refused.json()["message"]
        deleted = await http.delete("/adapters/v1.0")
        assert deleted.status_code == 200 and deleted.json()["deleted"] == ["v1.0"]
        assert (await http.get("/adapters/v1.0")).status_code == 404
        gc = await http.post("/adapters/gc", params={"keep": 0, "dry_run": True})
        assert gc.json()["kept"] == ["v1.2", "v1.1"] and gc.json()["deleted"] == [] and gc.json()["dry_run"]

        await add_samples(line.db, 0, 3)
        train = await http.post("/train", params={"major": True}, json={"min_samples": 1})
        assert train.status_code == 202, train.text
    assert await line.db.fetchval("SELECT major FROM jobs WHERE id = $1", train.json()["job_id"]) is True


async def test_cli_adapters_commands_through_the_admin_api(line: Line) -> None:
    """`streamengine adapters list|info|deploy|rollback|delete|gc` and `train --major` against a live API."""
    import asyncio
    import contextlib

    import uvicorn
    from click.testing import CliRunner

    from streamengine.api.app import create_app
    from streamengine.api.context import EngineContext
    from streamengine.cli.main import cli
    from streamengine.local.embedded import free_port

    for i in range(4):
        await line.release(i)
    producer = await start_producer(line.settings.kafka)
    ctx = EngineContext(line.settings, line.db, line.store, producer, reads=line.db)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))  # fmt: skip
    task = asyncio.create_task(server.serve())
    env = {"STREAMENGINE_API__URL": f"http://127.0.0.1:{port}", "COLUMNS": "160", "NO_COLOR": "1"}

    async def run(*args: str) -> Any:
        result = await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    try:
        await wait_for(lambda: server.started, 30, interval_s=0.02)
        table = await run("adapters", "list")
        assert "v1.3" in table and "production" in table and "previous" in table
        assert [a["version"] for a in json.loads(await run("adapters", "list", "--json"))] == [
            "v1.3", "v1.2", "v1.1", "v1.0"
        ]  # fmt: skip
        assert json.loads(await run("adapters", "info", "previous", "--json"))["version"] == "v1.2"
        assert "v1.0 deployed" in await run("adapters", "deploy", "v1.0")
        assert "rolled back to v1.3" in await run("adapters", "rollback")
        assert "v1.1 deleted (4 objects removed)" in await run("adapters", "delete", "v1.1")
        dry = json.loads(await run("adapters", "gc", "--keep", "0", "--dry-run", "--json"))
        assert (dry["deleted"], dry["kept"], dry["dry_run"]) == (["v1.2"], ["v1.3", "v1.0"], True)
        assert "v1.2" in await run("adapters", "gc", "--keep", "0")
        assert [a.version for a in await registry.list_adapters(line.db, MODEL)] == ["v1.3", "v1.0"]
        await add_samples(line.db, 0, 2)
        job = json.loads(await run("train", "--major", "--json"))
        assert await line.db.fetchval("SELECT major FROM jobs WHERE id = $1", job["job_id"]) is True
        assert await line.relay()  # deploy and rollback were queued for the fleet
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()
