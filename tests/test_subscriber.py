"""The serving-node subscriber against a real broker and S3 server, swapping real PEFT adapters."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from streamengine.errors import ServiceUnavailable
from streamengine.serving import CallbackSwapper, PeftSwapper, Subscriber, adapter_name
from streamengine.store.objects import ObjectStore
from tests.serving_tools import Fleet, make_adapter

pytestmark = pytest.mark.integration

PROMPT = "Hello, adapter!"


@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model, root / f"a{seed}", seed) for seed in range(4)]


@pytest.fixture(scope="session")
def reference_logits(tiny_model: Path, adapters: list[Path]) -> list[Any]:
    """Logits of each adapter, computed apart from the swapper (a fresh base per adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    out = []
    for folder in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder)).eval()
        with torch.no_grad():
            out.append(model(**inputs).logits[0, -1].float())
    return out


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def model_name() -> str:
    return f"tiny-{uuid.uuid4().hex[:8]}"  # metrics are per model: unique per test


def _tamper(fleet: Fleet, version: str) -> None:
    key = f"{fleet.model}/{version}/adapter_model.safetensors"
    data = fleet.store.client.get_object(fleet.store.bucket, key).read()
    data = data[:-8] + b"\x00" * 8  # same size, other weights
    fleet.store.client.put_object(fleet.store.bucket, key, io.BytesIO(data), len(data))


async def test_late_subscriber_bootstraps_to_latest_and_follows(
    make_settings, tiny_model: Path, adapters: list[Path], reference_logits: list[Any], model_name: str
) -> None:
    import torch

    settings = make_settings()
    fleet = Fleet(settings, model_name)
    await fleet.create_topic(3)  # the model's records land in one partition; the others stay empty
    events = [fleet.release(adapters[i], f"v1.{i}") for i in range(3)]
    other = Fleet(settings, "other-model")
    await fleet.produce(events[0], b"{not json", events[1], events[2])
    await other.produce(other.release(adapters[3], "v1.9"))  # the latest record, but another model's

    swapper = PeftSwapper(tiny_model)
    started = time.perf_counter()
    async with Subscriber(settings, swapper, model_name) as sub:
        bootstrap_s = time.perf_counter() - started
        assert sub.current == "v1.2"  # ready means bootstrapped: the latest release is serving
        assert torch.allclose(swapper.logits(PROMPT), reference_logits[2], atol=1e-5)
        assert _metric("streamengine_subscriber_swaps_total", model=model_name) == 1  # not v1.0, v1.1
        assert _metric("streamengine_subscriber_swap_failures_total", model=model_name, reason="bad_record") == 1
        assert _metric("streamengine_subscriber_current_version_info", model=model_name, version="v1.2") == 1

        produced = time.perf_counter()
        await fleet.produce(fleet.release(adapters[3], "v1.3"))
        await sub.wait_for_version("v1.3", 20)
        live_s = time.perf_counter() - produced
        assert torch.allclose(swapper.logits(PROMPT), reference_logits[3], atol=1e-5)
        # The previous adapter stays loaded (the other slot), older ones are gone; likewise on disk.
        assert swapper.slots == {adapter_name(model_name, "slot-a"): "v1.2", adapter_name(model_name, "slot-b"): "v1.3"}
        assert sorted(p.name for p in sub.download_dir.iterdir() if p.is_dir()) == ["v1.2", "v1.3"]
        assert sub.outcomes[-1].status == "swapped"
        assert set(sub.outcomes[-1].stages) == {"consume", "download", "verify", "swap"}
        current = json.loads((sub.download_dir / "current.json").read_text())
        assert (current["version"], current["previous"]) == ("v1.3", "v1.2")
    print(
        f"\nbootstrap+first swap {bootstrap_s * 1000:.0f} ms; live record->serving {live_s * 1000:.0f} ms; "
        f"swap (load_adapter+set_adapter) {swapper.last_swap_s * 1000:.1f} ms"  # type: ignore[operator]
    )


async def test_tampered_adapter_refused_current_keeps_serving(
    make_settings, tiny_model: Path, adapters: list[Path], model_name: str
) -> None:
    import torch

    settings = make_settings()
    fleet = Fleet(settings, model_name)
    await fleet.produce(fleet.release(adapters[0], "v1.0"))
    swapper = PeftSwapper(tiny_model)
    async with Subscriber(settings, swapper, model_name) as sub:
        assert sub.current == "v1.0"
        before = swapper.logits(PROMPT)

        bad = fleet.release(adapters[1], "v1.1")
        _tamper(fleet, "v1.1")
        await fleet.produce(bad)
        await sub.wait_until(lambda: any(o.version == "v1.1" for o in sub.outcomes), 20)
        outcome = sub.outcomes[-1]
        assert (outcome.status, outcome.reason) == ("failed", "integrity")
        assert "adapter_model.safetensors" in outcome.detail
        assert sub.current == "v1.0"
        assert torch.equal(swapper.logits(PROMPT), before)
        assert not (sub.download_dir / "v1.1").exists()
        assert _metric("streamengine_subscriber_swap_failures_total", model=model_name, reason="integrity") == 1

        await fleet.produce(fleet.release(adapters[2], "v1.2"))  # a good release after a bad one
        await sub.wait_for_version("v1.2", 20)
        assert not torch.equal(swapper.logits(PROMPT), before)


async def test_signing_key_refuses_unsigned_and_wrong(make_settings, adapters: list[Path], model_name: str) -> None:
    settings = make_settings(signing_key="release-key")
    fleet = Fleet(settings, model_name)
    calls: list[str] = []
    swapper = CallbackSwapper(lambda model, version, folder: calls.append(version))
    # The topic does not exist yet: the subscriber starts empty and picks it up when it appears.
    async with Subscriber(settings, swapper, model_name) as sub:
        assert sub.current is None
        unsigned = fleet.release(adapters[0], "v1.0")
        wrong = fleet.release(adapters[1], "v1.1", key="another-key")
        forged = fleet.release(adapters[1], "v1.4", key="release-key").model_copy(update={"files": unsigned.files})
        for count, event in enumerate((unsigned, wrong, forged), 1):  # one at a time (no coalescing)
            await fleet.produce(event)
            await sub.wait_until(lambda n=count: len(sub.outcomes) == n, 30)
        assert [(o.version, o.reason) for o in sub.outcomes] == [
            ("v1.0", "signature"), ("v1.1", "signature"), ("v1.4", "signature")
        ]  # fmt: skip
        assert "unsigned" in sub.outcomes[0].detail
        assert _metric("streamengine_subscriber_swap_failures_total", model=model_name, reason="signature") == 3

        await fleet.produce(fleet.release(adapters[2], "v1.2", key="release-key"))
        await sub.wait_for_version("v1.2", 20)
        assert calls == ["v1.2"]
        assert sorted(p.name for p in (sub.download_dir / "v1.2").iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"
        ]  # fmt: skip


async def test_duplicates_ignored_rollback_applied(make_settings, adapters: list[Path], model_name: str) -> None:
    from streamengine.core.release import republish

    settings = make_settings()
    fleet = Fleet(settings, model_name)
    calls: list[str] = []

    async def record(model: str, version: str, folder: Path) -> None:
        assert (folder / "adapter_config.json").is_file()
        calls.append(version)

    v10 = fleet.release(adapters[0], "v1.0")
    await fleet.produce(v10, v10)  # the same record twice
    async with Subscriber(settings, CallbackSwapper(record), model_name) as sub:
        assert calls == ["v1.0"]
        assert [o.reason for o in sub.outcomes] == ["redelivered", "threshold"]  # same event_id twice
        await fleet.produce(republish(v10, "manual", datetime.now(UTC), None))  # same version again
        await sub.wait_until(lambda: len(sub.outcomes) == 3, 20)
        assert (sub.outcomes[-1].status, sub.outcomes[-1].reason) == ("ignored", "duplicate")
        assert _metric("streamengine_subscriber_releases_ignored_total", model=model_name, reason="duplicate") == 1

        await fleet.produce(fleet.release(adapters[1], "v1.1"))
        await sub.wait_for_version("v1.1", 20)
        await fleet.produce(republish(v10, "rollback", datetime.now(UTC), None))  # older, but the latest
        await sub.wait_for_version("v1.0", 20)
        assert calls == ["v1.0", "v1.1", "v1.0"]
        assert _metric("streamengine_subscriber_swaps_total", model=model_name) == 3


async def test_apply_directly_and_bad_records(make_settings, adapters: list[Path], model_name: str) -> None:
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    swapper = CallbackSwapper(lambda *_: None)
    sub = Subscriber(settings, swapper, model_name)
    event = fleet.release(adapters[0], "v2.0")
    assert (await sub.apply(event)).status == "swapped"
    assert (await sub.apply(event)).reason == "duplicate"
    missing = event.model_copy(update={"version": "v2.1", "uri": fleet.store.uri(model_name, "v9.9")})
    outcome = await sub.apply(missing)
    assert (outcome.status, outcome.reason) == ("failed", "integrity") and "missing" in outcome.detail
    other = event.model_copy(update={"model": "someone-else", "version": "v3.0"})
    assert (await sub.apply(other)).reason == "other_model"
    assert swapper.current == "v2.0"

    # Bad records of every kind are skipped and counted; records keyed for other models are not ours.
    wrong_model = json.dumps({**json.loads(event.model_dump_json()), "model": "x", "version": "v2.2"}).encode()
    await fleet.produce(None, b"\xff\xfe", b"[1, 2]", b'{"model": "m"}', wrong_model)
    await fleet.produce(b"garbage", key="not-our-model")
    async with Subscriber(settings, CallbackSwapper(lambda *_: None), model_name) as sub2:
        assert sub2.current is None
        assert [o.reason for o in sub2.outcomes] == ["bad_record"] * 5


async def test_failed_load_keeps_current_adapter(tiny_model: Path, adapters: list[Path], tmp_path: Path) -> None:
    import shutil

    import torch

    swapper = PeftSwapper(tiny_model)
    await swapper.swap("m", "v1.0", adapters[0])
    before = swapper.logits(PROMPT)
    broken = tmp_path / "broken"
    shutil.copytree(adapters[1], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="loadable adapter"):
        await swapper.swap("m", "v1.1", broken)
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_TYPE"}))
    shutil.copy(adapters[1] / "adapter_model.safetensors", weights)
    with pytest.raises(Exception):  # noqa: B017 - whatever peft raises, the swap must not stick
        await swapper.swap("m", "v1.1", broken)
    assert swapper.current == "v1.0"
    assert set(swapper.model.peft_config) == {adapter_name("m", "slot-a")}
    assert torch.equal(swapper.logits(PROMPT), before)
    # A rollback to the previous version is a set_adapter away (still loaded).
    await swapper.swap("m", "v1.1", adapters[1])
    await swapper.swap("m", "v1.0", adapters[0])
    assert torch.equal(swapper.logits(PROMPT), before)
    assert swapper.generate(PROMPT, max_new_tokens=4) is not None


async def test_unreachable_kafka_is_service_unavailable(make_settings, model_name: str) -> None:
    from streamengine.local.embedded import free_port

    settings = make_settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    sub = Subscriber(settings, CallbackSwapper(lambda *_: None), model_name)
    with pytest.raises(ServiceUnavailable, match="Kafka"):
        await asyncio.wait_for(sub.start(), 60)


async def test_redelivered_records_never_step_back(make_settings, adapters: list[Path], model_name: str) -> None:
    """At-least-once delivery (an outbox relay resending after a crash) repeats old records after newer ones."""
    settings = make_settings()
    fleet = Fleet(settings, model_name)
    v10, v11 = fleet.release(adapters[0], "v1.0"), fleet.release(adapters[1], "v1.1")
    await fleet.produce(v10, v11, v10)  # v1.0 again: the latest record, but an old event
    calls: list[str] = []
    async with Subscriber(settings, CallbackSwapper(lambda m, v, f: calls.append(v)), model_name) as sub:
        assert sub.current == "v1.1" and calls == ["v1.1"]
        await fleet.produce(v10, v11)
        await sub.wait_until(lambda: len(sub.outcomes) >= 5, 20)
        assert [(o.version, o.reason) for o in sub.outcomes][-2:] == [("v1.0", "redelivered"), ("v1.1", "redelivered")]
        assert sub.current == "v1.1" and calls == ["v1.1"]
        assert _metric("streamengine_subscriber_releases_ignored_total", model=model_name, reason="redelivered") == 3


async def test_node_keeps_serving_while_download_fails_then_catches_up(
    services, make_settings, tiny_model: Path, adapters: list[Path], reference_logits: list[Any], model_name: str
) -> None:
    import torch

    settings = make_settings()
    fleet = Fleet(settings, model_name)
    await fleet.produce(fleet.release(adapters[0], "v1.0"))
    v11 = fleet.release(adapters[1], "v1.1")
    store = ObjectStore.from_settings(settings.storage, attempts=2, backoff_s=0.05, read_timeout_s=5)
    swapper = PeftSwapper(tiny_model)
    async with Subscriber(settings, swapper, model_name, store=store, retry_initial_s=0.3, retry_max_s=1) as sub:
        assert sub.current == "v1.0"
        services.s3.stop()
        try:
            await fleet.produce(v11)
            await sub.wait_until(lambda: any(o.version == "v1.1" for o in sub.outcomes), 30)
            failed = sub.outcomes[-1]
            assert (failed.status, failed.reason) == ("failed", "storage") and "S3" in failed.detail
            # The node keeps answering with v1.0 while S3 is down, and keeps retrying.
            for _ in range(3):
                assert sub.current == "v1.0"
                assert torch.allclose(swapper.logits(PROMPT), reference_logits[0], atol=1e-5)
                await asyncio.sleep(0.3)
            assert not (sub.download_dir / "v1.1").exists()
        finally:
            services.s3.start()
        await sub.wait_for_version("v1.1", 30)  # retried after S3 came back, without a new record
        assert torch.allclose(swapper.logits(PROMPT), reference_logits[1], atol=1e-5)
        assert _metric("streamengine_subscriber_swap_failures_total", model=model_name, reason="storage") >= 1
        assert _metric("streamengine_subscriber_retries_total", model=model_name) >= 1


async def test_peft_swapper_hotswaps_in_place_when_rank_and_targets_match(
    tiny_model: Path, adapters: list[Path], reference_logits: list[Any], tmp_path: Path
) -> None:
    import torch

    wider = make_adapter(tiny_model, tmp_path / "r8", seed=7, r=8)
    swapper = PeftSwapper(tiny_model)
    steps = [(0, "v1.0"), (1, "v1.1"), (2, "v1.2"), (3, "v1.3"), (2, "v1.2"), (3, "v1.3")]
    methods = []
    for index, version in steps:
        await swapper.swap("m", version, adapters[index])
        methods.append(swapper.last_method)
        assert torch.allclose(swapper.logits(PROMPT), reference_logits[index], atol=1e-5), version
    # First wraps the base, second fills the other slot, then weights are copied in place; going back to
    # the previous version (still loaded in the other slot) is only a switch.
    assert methods == ["from_pretrained", "load_adapter", "hotswap", "hotswap", "set_adapter", "set_adapter"]
    assert set(swapper.model.peft_config) == {adapter_name("m", "slot-a"), adapter_name("m", "slot-b")}

    await swapper.swap("m", "v2.0", wider)  # rank 8 into a rank-4 slot: loaded afresh instead
    assert swapper.last_method == "load_adapter" and (swapper.current, swapper.previous) == ("v2.0", "v1.3")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(wider)).eval()
    with torch.no_grad():
        expected = fresh(**swapper.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
    assert torch.allclose(swapper.logits(PROMPT), expected, atol=1e-5)
    await swapper.swap("m", "v1.4", adapters[0])  # back to rank 4, into the slot that held v1.3 (rank 4)
    assert swapper.last_method == "hotswap"
    assert torch.allclose(swapper.logits(PROMPT), reference_logits[0], atol=1e-5)

    plain = PeftSwapper(tiny_model, hotswap=False)
    for index, version in steps[:3]:
        await plain.swap("m", version, adapters[index])
    assert plain.last_method == "load_adapter"
    assert torch.allclose(plain.logits(PROMPT), reference_logits[2], atol=1e-5)
