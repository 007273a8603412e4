"""Releases and serving nodes as an attacker and an operator see them: who can sign (HMAC, Ed25519), what
a node does without a key, replayed old records, which record is "latest", bounded downloads, and the
reload after an inference server restarts.

Integration tests run against the real broker, S3 server and PostgreSQL; records a registry would write go
through the registry's own code and the outbox relay, records it never would (forged, replayed, lying
about their size) through a test producer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streamengine.config.keys import ensure_key_pair, release_signer, release_verifier
from streamengine.config.settings import Settings, load_settings
from streamengine.contract.events import AdapterReleased, LoraSpec, json_schemas
from streamengine.core.manifest import Signer, sign, signature_valid
from streamengine.core.release import build_release
from streamengine.errors import ConfigError, IntegrityError
from streamengine.serving import CallbackSwapper, HttpSwapper, Subscriber, lora_name
from streamengine.store import job_queue, registry
from streamengine.store.db import Database
from streamengine.store.folders import CHUNK, DownloadLimits, file_sha256, write_chunks
from streamengine.store.objects import ObjectStore
from streamengine.stream.outbox import relay_once
from streamengine.stream.producer import start_producer
from tests.faults.stall_proxy import StallProxy
from tests.kafka_tools import read_all
from tests.polling import wait_for
from tests.serving_tools import FakeLoraServer, Fleet

MODEL = "tiny-llama"
MIB = 1 << 20
V1_REQUIRED = ["event_id", "model", "version", "base_model", "uri", "files", "size_bytes", "lora", "ewc_lambda",
               "reason", "created_at"]  # fmt: skip


def _folder(root: Path, version: str, weights: int = 64) -> Path:
    """An adapter folder whose weights file holds ``weights`` bytes (random: every version differs)."""
    folder = root / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "version": version}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(weights))
    return folder


def _release(signer: Signer | None, **fields: Any) -> AdapterReleased:
    values: dict[str, Any] = {
        "model": MODEL, "version": "v1.1", "parent_version": "v1.0", "base_model": "tiny",
        "uri": f"s3://lora-adapters/{MODEL}/v1.1/", "files": {"adapter_model.safetensors": "ab" * 32},
        "file_sizes": {"adapter_model.safetensors": 123}, "size_bytes": 123,
        "lora": LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), "ewc_lambda": 500.0, "window": None,
        "metrics": {}, "reason": "threshold", "now": datetime(2025, 1, 2, tzinfo=UTC),
    }  # fmt: skip
    return build_release(**{**values, **fields}, signer=signer)


def _wire(event: AdapterReleased) -> dict[str, Any]:
    """The record as a subscriber receives it (JSON)."""
    return json.loads(event.model_dump_json())


# --- keys and signatures (no services) -----------------------------------------------------------------------
def test_ed25519_and_hmac_signatures_sit_side_by_side(tmp_path: Path) -> None:
    private, public = ensure_key_pair(tmp_path / "release")
    signer = release_signer(load_settings(signing_key="shared", signing={"private_key_file": private}))
    assert signer is not None and signer.private_key is not None
    record = _wire(_release(signer))
    assert record["signature_ed25519"] and record["signature"]
    # A subscriber of before Ed25519 checks the HMAC over the JSON it received: still valid.
    assert signature_valid(record, "shared")

    node = release_verifier(load_settings(serving={"public_key_file": public}))
    assert node.hmac_key is None and node.problem(record) is None  # the node holds no key that can sign
    assert node.problem({**record, "uri": "s3://elsewhere/x/v1.1/"}) == "has a wrong Ed25519 signature"
    assert node.problem({**record, "sequence": 99}) == "has a wrong Ed25519 signature"  # the sequence is signed
    assert node.problem({**record, "event_id": "fresh"}) is None  # the id is per publication, not signed
    stranger = release_verifier(load_settings(serving={"public_key_file": ensure_key_pair(tmp_path / "other")[1]}))
    assert stranger.problem(record) == "has a wrong Ed25519 signature"
    assert "not signed with a kind of key" in str(node.problem(_wire(_release(Signer(hmac_key="shared")))))
    assert node.problem(_wire(_release(None))) == "is unsigned and this node requires a signature"
    both = release_verifier(load_settings(signing_key="shared", serving={"public_key_file": public}))
    assert both.problem(record) is None and both.problem({**record, "signature": "00" * 32}) == "has a wrong signature"


def test_key_settings_are_checked_when_a_process_starts(tmp_path: Path) -> None:
    private, public = ensure_key_pair(tmp_path / "release")
    assert private.stat().st_mode & 0o777 == 0o600  # the key that signs: its owner's only
    pem = private.read_bytes()
    assert ensure_key_pair(tmp_path / "release") == (private, public) and private.read_bytes() == pem  # kept
    with pytest.raises(ConfigError, match="no key to check releases with"):
        Subscriber(load_settings(serving={"require_signature": True}), CallbackSwapper(lambda *_: None))
    with pytest.raises(ConfigError, match=r"serving.public_key_file .*cannot read"):
        release_verifier(load_settings(serving={"public_key_file": tmp_path / "missing.pub"}))
    with pytest.raises(ConfigError, match=r"serving.public_key_file .*holds no usable key"):
        release_verifier(load_settings(serving={"public_key_file": private}))  # the private key, by mistake
    with pytest.raises(ConfigError, match=r"signing.private_key_file .*holds no usable key"):
        release_signer(load_settings(signing={"private_key_file": public}))
    assert release_signer(load_settings()) is None and not release_verifier(load_settings()).configured
    required = release_verifier(load_settings(serving={"public_key_file": public, "require_signature": True}))
    assert required.configured


def test_adapter_released_stays_v1_compatible() -> None:
    """New fields are optional; a record from an older engine (none of them, HMAC as before) is accepted."""
    schema = json_schemas()["adapter-released.v1.json"]
    assert sorted(schema["required"]) == sorted(V1_REQUIRED)
    assert {"sequence", "file_sizes", "signature_ed25519"} <= set(schema["properties"])
    old = {k: v for k, v in _wire(_release(None)).items() if k not in ("sequence", "file_sizes", "signature_ed25519")}
    old["signature"] = sign(old, "shared")
    assert release_verifier(load_settings(signing_key="shared")).problem(old) is None
    assert AdapterReleased.model_validate({**old, "some_future_field": 1}).sequence is None


def test_a_download_stops_at_the_first_chunk_past_its_budget(tmp_path: Path) -> None:
    pulled = []

    def chunks() -> Any:
        for i in range(10):
            pulled.append(i)
            yield b"x" * 1024

    with pytest.raises(
        IntegrityError, match=r"more bytes than its declared size of 2500 bytes; download stopped after 3072"
    ):
        write_chunks(
            chunks(), tmp_path / "f.safetensors", DownloadLimits({"f.safetensors": 2500}).budget("f.safetensors", 0)
        )
    assert len(pulled) == 3 and (tmp_path / "f.safetensors").stat().st_size == 2048
    limits = DownloadLimits({"a": 10}, declared_total=100, max_total=50)
    assert limits.budget("a", 0) == (10, "its declared size of 10 bytes")
    assert limits.budget("b", 45) == (5, "serving.max_adapter_bytes (50)")
    assert DownloadLimits(declared_total=100).budget("b", 30) == (70, "the release's size_bytes (100)")
    assert DownloadLimits().budget("b", 0) is None


# --- serving nodes against the real services -------------------------------------------------------------------
@pytest.fixture
def model_name() -> str:
    return f"sec-{uuid.uuid4().hex[:8]}"  # metrics are per model line: one per test


def _recorder(calls: list[str]) -> CallbackSwapper:
    return CallbackSwapper(lambda model, version, folder: calls.append(version))


async def _next_outcome(sub: Subscriber, produce: Any) -> Any:
    """Run ``produce`` (a coroutine) and return the outcome it leads to."""
    seen = len(sub.outcomes)
    await produce
    await sub.wait_until(lambda: len(sub.outcomes) > seen, 30)
    return sub.outcomes[-1]


@pytest.mark.integration
async def test_node_without_a_key_says_so_once_at_start(
    make_settings: Any, model_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    def unsigned_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "UNSIGNED" in r.message]

    with caplog.at_level(logging.WARNING, logger="streamengine.serving.subscriber"):
        async with Subscriber(make_settings(), CallbackSwapper(lambda *_: None), model_name):
            pass
        assert len(unsigned_warnings()) == 1
        assert "serving.require_signature" in unsigned_warnings()[0] and model_name in unsigned_warnings()[0]
        caplog.clear()
        async with Subscriber(make_settings(signing_key="k"), CallbackSwapper(lambda *_: None), model_name):
            pass
        assert unsigned_warnings() == []


@pytest.mark.integration
async def test_required_signature_refuses_unsigned_and_foreign_releases_and_keeps_serving(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    private, public = ensure_key_pair(tmp_path / "release")
    other, _ = ensure_key_pair(tmp_path / "other")
    settings = make_settings(serving={"public_key_file": public, "require_signature": True})
    engine = release_signer(make_settings(signing={"private_key_file": private}))
    stranger = release_signer(make_settings(signing={"private_key_file": other}))
    fleet = Fleet(settings, model_name)
    await fleet.produce(fleet.release(_folder(tmp_path, "v1.0"), "v1.0", signer=engine))
    calls: list[str] = []
    async with Subscriber(settings, _recorder(calls), model_name) as sub:
        assert sub.current == "v1.0"
        refused = [
            fleet.release(_folder(tmp_path, "v1.1"), "v1.1"),
            fleet.release(_folder(tmp_path, "v1.2"), "v1.2", key="shared"),  # HMAC: this node holds no HMAC key
            fleet.release(_folder(tmp_path, "v1.3"), "v1.3", signer=stranger),
        ]  # fmt: skip
        outcomes = [await _next_outcome(sub, fleet.produce(event)) for event in refused]
        assert [(o.version, o.status, o.reason) for o in outcomes] == [
            ("v1.1", "failed", "signature"), ("v1.2", "failed", "signature"), ("v1.3", "failed", "signature")
        ]  # fmt: skip
        assert "v1.1 is unsigned" in outcomes[0].detail and "kind of key" in outcomes[1].detail
        assert "wrong Ed25519 signature" in outcomes[2].detail
        assert sub.current == "v1.0" and calls == ["v1.0"]
        await fleet.produce(fleet.release(_folder(tmp_path, "v1.4"), "v1.4", signer=engine))
        await sub.wait_for_version("v1.4", 20)


async def _registry_release(db: Database, store: ObjectStore, settings: Settings, folder: Path) -> AdapterReleased:
    """A release down the worker's path without the training: job, reserved version, upload, registry and outbox."""
    await db.execute("INSERT INTO model_lines (model) VALUES ($1) ON CONFLICT DO NOTHING", MODEL)
    window = await db.fetchval("INSERT INTO windows (model, state) VALUES ($1, 'closed') RETURNING id", MODEL)
    await db.execute("INSERT INTO jobs (model, window_id, reason) VALUES ($1, $2, 'threshold')", MODEL, window)
    job = await job_queue.claim(db, "tester", 60, 3)
    assert job is not None
    version = await job_queue.reserve_version(db, job.id, "tester")
    files = await store.aupload_folder(folder, MODEL, version)
    sizes = {name: (folder / name).stat().st_size for name in files}
    signer = release_signer(settings)
    event = build_release(
        model=MODEL, version=version, parent_version=job.parent_version, base_model="tiny",
        uri=store.uri(MODEL, version), files=files, file_sizes=sizes, size_bytes=sum(sizes.values()),
        lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), ewc_lambda=500.0, window=None, metrics={},
        reason="threshold", now=datetime.now(UTC), signer=signer,
    )  # fmt: skip
    return await job_queue.release(db, job.id, "tester", event, settings.kafka.released_topic, signer)


async def _relay(db: Database, settings: Settings) -> list[dict[str, Any]]:
    """Publish the outbox (the engine's relay) and return every record of the topic."""
    producer = await start_producer(settings.kafka)
    try:
        while await relay_once(db, producer):
            pass
    finally:
        await producer.stop()
    return [
        json.loads(r.value) for r in await read_all(settings.kafka.bootstrap_servers, settings.kafka.released_topic)
    ]


def _replayed(record: dict[str, Any]) -> bytes:
    """An old signed record sent again with a fresh ``event_id`` (outside the signature), as an attacker would."""
    return json.dumps({**record, "event_id": str(uuid.uuid4())}).encode()


@pytest.mark.integration
async def test_replayed_old_record_is_refused_and_a_registry_rollback_applied(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(signing_key="fleet-key")
    fleet = Fleet(settings, MODEL)
    db = await Database.connect(settings.database)
    try:
        for i in range(2):
            await _registry_release(db, fleet.store, settings, _folder(tmp_path, f"v1.{i}"))
        v10, v11 = await _relay(db, settings)
        assert v10["sequence"] < v11["sequence"] and signature_valid(v10, "fleet-key")
        calls: list[str] = []
        async with Subscriber(settings, _recorder(calls), MODEL) as sub:
            assert sub.current == "v1.1"
            outcome = await _next_outcome(sub, fleet.produce(_replayed(v10)))
            assert (outcome.version, outcome.status, outcome.reason) == ("v1.0", "failed", "stale")
            assert "not newer than v1.1" in outcome.detail and sub.current == "v1.1"

            rolled = await registry.rollback(db, MODEL, settings.kafka.released_topic, release_signer(settings))
            assert rolled.sequence is not None and rolled.sequence > v11["sequence"]
            await _relay(db, settings)
            await sub.wait_for_version("v1.0", 20)  # the registry's rollback: newer, so applied
            outcome = await _next_outcome(sub, fleet.produce(_replayed(v11)))  # v1.1's record is old now
            assert (outcome.version, outcome.reason) == ("v1.1", "stale") and sub.current == "v1.0"
        assert calls == ["v1.1", "v1.0"]
        current = json.loads((sub.download_dir / "current.json").read_text())
        assert (current["version"], current["sequence"]) == ("v1.0", rolled.sequence)

        # A node starting now takes the registry's newest record (the rollback), not the last one (a replay).
        async with Subscriber(settings, CallbackSwapper(lambda *_: None), MODEL) as again:
            assert again.current == "v1.0"
        # Compaction may leave only the replayed record; a restarted node still refuses it (current.json).
        compacted = make_settings(signing_key="fleet-key", kafka={"released_topic": f"compacted-{uuid.uuid4().hex}"})
        await Fleet(compacted, MODEL).produce(_replayed(v11))
        async with Subscriber(compacted, CallbackSwapper(lambda *_: None), MODEL) as restarted:
            assert restarted.current is None and restarted.outcomes[-1].reason == "stale"
    finally:
        await db.close()


@pytest.mark.integration
async def test_bootstrap_takes_the_last_record_by_offset_not_by_producer_time(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    v11, v12 = (fleet.release(_folder(tmp_path, v), v) for v in ("v1.1", "v1.2"))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for event, stamp in ((v11, now_ms + 86_400_000), (v12, now_ms)):  # v1.1 claims to come from tomorrow
            await producer.send_and_wait(
                settings.kafka.released_topic, event.model_dump_json().encode(), model_name.encode(), timestamp_ms=stamp
            )
    finally:
        await producer.stop()
    stamps = [r.timestamp for r in await read_all(settings.kafka.bootstrap_servers, settings.kafka.released_topic)]
    assert stamps[0] > stamps[1]  # the broker kept the producers' times
    async with Subscriber(settings, CallbackSwapper(lambda *_: None), model_name) as sub:
        assert sub.current == "v1.2"


@pytest.mark.integration
async def test_an_object_larger_than_declared_is_cut_off_and_the_node_keeps_serving(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    await fleet.produce(fleet.release(_folder(tmp_path, "v1.0"), "v1.0"))
    big = _folder(tmp_path, "v1.1", weights=8 * MIB)
    declared = {"adapter_config.json": (big / "adapter_config.json").stat().st_size, "adapter_model.safetensors": MIB}
    calls: list[str] = []
    async with Subscriber(settings, _recorder(calls), model_name) as sub:
        outcome = await _next_outcome(sub, fleet.produce(fleet.release(big, "v1.1", file_sizes=declared)))
        assert (outcome.version, outcome.status, outcome.reason) == ("v1.1", "failed", "integrity")
        assert f"more bytes than its declared size of {MIB} bytes" in outcome.detail
        stopped = int(re.search(r"stopped after (\d+)", outcome.detail).group(1))  # type: ignore[union-attr]
        assert stopped <= MIB + CHUNK  # one chunk past the declared size, not 8 MiB
        assert sub.current == "v1.0" and calls == ["v1.0"]
        assert sorted(p.name for p in sub.download_dir.iterdir()) == ["current.json", "v1.0"]  # nothing left over


@pytest.mark.integration
async def test_max_adapter_bytes_caps_releases_with_and_without_declared_sizes(
    make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    settings = make_settings(serving={"max_adapter_bytes": 2 * MIB})
    fleet = Fleet(settings, model_name)
    declared, undeclared = _folder(tmp_path, "v1.1", weights=4 * MIB), _folder(tmp_path, "v1.2", weights=4 * MIB)
    sizes = {p.name: p.stat().st_size for p in declared.iterdir()}
    calls: list[str] = []
    async with Subscriber(settings, _recorder(calls), model_name) as sub:
        outcome = await _next_outcome(sub, fleet.produce(fleet.release(declared, "v1.1", file_sizes=sizes)))
        assert (outcome.status, outcome.reason) == ("failed", "too_large") and "declares" in outcome.detail
        assert "download" not in outcome.stages  # refused before a byte was fetched
        outcome = await _next_outcome(sub, fleet.produce(fleet.release(undeclared, "v1.2")))  # sizes unknown
        assert (outcome.status, outcome.reason) == ("failed", "integrity")
        assert f"serving.max_adapter_bytes ({2 * MIB})" in outcome.detail
        await fleet.produce(fleet.release(_folder(tmp_path, "v1.3"), "v1.3"))
        await sub.wait_for_version("v1.3", 20)
        assert calls == ["v1.3"]


@pytest.mark.integration
async def test_a_stalled_download_ends_at_its_deadline_and_a_newer_release_goes_through(
    services: Any, make_settings: Any, model_name: str, tmp_path: Path
) -> None:
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    trigger = f"GET /{settings.storage.bucket}/{model_name}/v1.1/adapter_model.safetensors".encode()
    calls: list[str] = []
    async with StallProxy(services.s3_endpoint, trigger, response_bytes=4096) as proxy:
        proxied = make_settings(storage={"endpoint": proxy.endpoint}, serving={"download_timeout_s": 1.5})
        store = ObjectStore.from_settings(proxied.storage, read_timeout_s=60)  # only the deadline can end it early
        await fleet.produce(fleet.release(_folder(tmp_path, "v1.0"), "v1.0"))
        async with Subscriber(proxied, _recorder(calls), model_name, store=store, retry_initial_s=60) as sub:
            assert sub.current == "v1.0"
            started = time.monotonic()
            outcome = await _next_outcome(sub, fleet.produce(fleet.release(_folder(tmp_path, "v1.1", MIB), "v1.1")))
            took = time.monotonic() - started
            assert proxy.stalled.is_set() and took < 10, took
            assert (outcome.version, outcome.status, outcome.reason) == ("v1.1", "failed", "storage")
            assert "took longer than 1.5 s" in outcome.detail
            await fleet.produce(fleet.release(_folder(tmp_path, "v1.2"), "v1.2"))
            await sub.wait_for_version("v1.2", 20)
    assert calls == ["v1.0", "v1.2"]
    print(f"\nstalled download abandoned {took:.1f}s after its record was produced (deadline 1.5 s)")


def _put(store: ObjectStore, key: str, data: bytes) -> None:
    store.client.put_object(store.bucket, key, io.BytesIO(data), len(data))


@pytest.mark.integration
async def test_reload_after_a_server_restart_verifies_the_folder_first(
    make_settings: Any, model_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    event = fleet.release(_folder(tmp_path, "v1.0"), "v1.0")
    await fleet.produce(event)
    name, key = lora_name(model_name, "v1.0"), f"{model_name}/v1.0/adapter_model.safetensors"
    async with FakeLoraServer("vllm") as server:
        swapper = HttpSwapper(server.url, "vllm")
        try:
            async with Subscriber(settings, swapper, model_name, reconcile_s=0.2) as sub:
                assert name in server.loaded
                local = sub.download_dir / "v1.0" / "adapter_model.safetensors"
                original = local.read_bytes()
                local.write_bytes(b"changed on the node's disk")
                _put(fleet.store, key, b"changed in S3")
                with caplog.at_level(logging.WARNING, logger="streamengine.serving.subscriber"):
                    server.restart()  # the server lost its adapters: the subscriber loads v1.0 again...
                    await wait_for(lambda: "reloading the served adapter v1.0 failed" in caplog.text, 20)
                assert name not in server.loaded  # ...but never from files that fail their sha256
                _put(fleet.store, key, original)
                await wait_for(lambda: name in server.loaded, 20)  # downloaded again, verified, loaded
                assert file_sha256(local) == event.files["adapter_model.safetensors"]
        finally:
            await swapper.aclose()
