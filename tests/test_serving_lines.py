"""A serving node following several model lines against a real broker and S3 server: each line's adapter
swapped on its own (one shared in-process model, one adapter per line), and every line of a base followed,
also one released later."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from streamengine.contract.events import status_key
from streamengine.serving import CallbackSwapper, PeftSwapper, Subscribers, Swapper
from tests.kafka_tools import read_all
from tests.polling import wait_for
from tests.serving_tools import Fleet, make_adapter

pytestmark = pytest.mark.integration

PROMPT = "Hello, lines!"


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("line-adapters")
    return [make_adapter(tiny_model, root / f"a{seed}", seed + 10, r=4 + 4 * (seed % 2)) for seed in range(3)]


@pytest.fixture(scope="module")
def reference_logits(tiny_model: Path, adapters: list[Path]) -> list[Any]:
    """Logits of the base alone, then of each adapter, each on a fresh base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inputs = AutoTokenizer.from_pretrained(tiny_model)(PROMPT, return_tensors="pt")
    models = [AutoModelForCausalLM.from_pretrained(tiny_model)] + [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder)) for folder in adapters
    ]
    with torch.no_grad():
        return [model.eval()(**inputs).logits[0, -1].float() for model in models]


async def _reported_matches(reported: Any, want: dict[str, str]) -> bool:
    latest = await reported()
    return all(latest.get(key) == version for key, version in want.items())


def _names() -> tuple[str, str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"alpha-{suffix}", f"beta-{suffix}", f"gamma-{suffix}"


async def test_two_lines_swap_independently_on_one_model(
    make_settings, tiny_model: Path, adapters: list[Path], reference_logits: list[Any]
) -> None:
    import torch

    settings = make_settings()
    alpha, beta, gamma = _names()
    fleets = {name: Fleet(settings, name) for name in (alpha, beta, gamma)}
    await fleets[alpha].produce(fleets[alpha].release(adapters[0], "v1.0"))
    await fleets[beta].produce(fleets[beta].release(adapters[1], "v1.0"))
    swapper = PeftSwapper(tiny_model)
    async with Subscribers(settings, swapper.line, [alpha, beta, gamma]) as node:
        # Bootstrap took each line's latest release; gamma has none and answers with the base alone.
        assert (node[alpha].current, node[beta].current, node[gamma].current) == ("v1.0", "v1.0", None)
        assert swapper.versions == {alpha: "v1.0", beta: "v1.0"}
        for line, reference in ((alpha, 1), (beta, 2), (gamma, 0)):
            assert torch.allclose(swapper.logits(PROMPT, model=line), reference_logits[reference], atol=1e-5), line
        with pytest.raises(ValueError, match="several model lines"):
            swapper.logits(PROMPT)

        await fleets[beta].produce(fleets[beta].release(adapters[2], "v1.1"))  # beta moves, alpha stays
        await node[beta].wait_for_version("v1.1", 20)
        assert (node[alpha].current, node[beta].current) == ("v1.0", "v1.1")
        assert torch.allclose(swapper.logits(PROMPT, model=beta), reference_logits[3], atol=1e-5)
        assert torch.allclose(swapper.logits(PROMPT, model=alpha), reference_logits[1], atol=1e-5)
        assert isinstance(swapper.generate(PROMPT, 4, model=alpha), str)

        await fleets[gamma].produce(fleets[gamma].release(adapters[0], "v1.0"))
        await node[gamma].wait_for_version("v1.0", 20)
        assert torch.allclose(swapper.logits(PROMPT, model=gamma), reference_logits[1], atol=1e-5)
        assert swapper.versions == {alpha: "v1.0", beta: "v1.1", gamma: "v1.0"}

        # Each line keeps its own current.json (version, previous, floors) in its own folder.
        states = {line: json.loads((node[line].download_dir / "current.json").read_text()) for line in (alpha, beta)}
        assert (states[alpha]["model"], states[alpha]["version"], states[alpha]["previous"]) == (alpha, "v1.0", None)
        assert (states[beta]["model"], states[beta]["version"], states[beta]["previous"]) == (beta, "v1.1", "v1.0")
        assert node[alpha].download_dir != node[beta].download_dir

        # The node reports each line on adapter.status under its own key, with that line's version.
        async def reported() -> dict[str, str | None]:
            records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.status_topic, 3.0)
            return {r.key.decode(): json.loads(r.value)["version"] for r in records if r.value and r.key}

        keys = {line: status_key(line, settings.serving.node) for line in (alpha, beta, gamma)}
        want = {keys[alpha]: "v1.0", keys[beta]: "v1.1", keys[gamma]: "v1.0"}
        await wait_for(lambda: _reported_matches(reported, want), 30)


async def test_every_line_of_a_base_is_followed_also_one_released_later(make_settings, adapters: list[Path]) -> None:
    settings = make_settings()
    alpha, beta, gamma = _names()
    fleets = {name: Fleet(settings, name) for name in (alpha, beta, gamma)}
    served: dict[str, list[str]] = {}

    def swapper_for(model: str) -> Swapper:
        return CallbackSwapper(lambda line, version, folder: served.setdefault(line, []).append(version))

    other_base = fleets[beta].release(adapters[1], "v1.0").model_copy(update={"base_model": "another-base"})
    await fleets[alpha].produce(fleets[alpha].release(adapters[0], "v1.0"))  # base "tiny"
    await fleets[beta].produce(other_base)
    async with Subscribers(settings, swapper_for, base="tiny", poll_ms=100) as node:
        assert list(node.lines) == [alpha] and served == {alpha: ["v1.0"]}
        await fleets[gamma].produce(fleets[gamma].release(adapters[2], "v1.0"))
        await wait_for(lambda: served.get(gamma) == ["v1.0"], 30)
        await fleets[alpha].produce(fleets[alpha].release(adapters[2], "v1.1"))
        await node[alpha].wait_for_version("v1.1", 20)
    assert served == {alpha: ["v1.0", "v1.1"], gamma: ["v1.0"]}


async def test_lines_on_one_inference_server_each_keep_their_own_versions(make_settings, adapters: list[Path]) -> None:
    from streamengine.serving.run import Swappers
    from tests.serving_tools import FakeLoraServer

    alpha, beta, _ = _names()
    async with FakeLoraServer("vllm") as vllm:
        settings = make_settings(serving={"swapper": "vllm", "server_url": vllm.url})
        fleets = {name: Fleet(settings, name) for name in (alpha, beta)}
        await fleets[alpha].produce(fleets[alpha].release(adapters[0], "v1.0"))
        await fleets[beta].produce(fleets[beta].release(adapters[1], "v1.0"))
        swappers = Swappers(settings, None, None)
        try:
            async with Subscribers(settings, swappers, [alpha, beta]) as node:
                assert set(vllm.loaded) == {f"{alpha}@v1.0", f"{beta}@v1.0"}
                for version, folder in (("v1.1", adapters[1]), ("v1.2", adapters[2])):
                    await fleets[alpha].produce(fleets[alpha].release(folder, version))
                    await node[alpha].wait_for_version(version, 20)
                # alpha unloaded its own v1.0 (current and previous stay); beta's only version is untouched.
                assert set(vllm.loaded) == {f"{alpha}@v1.1", f"{alpha}@v1.2", f"{beta}@v1.0"}
                served = json.loads((node[alpha].download_dir / "current.json").read_text())["served_name"]
                assert served == f"{alpha}@v1.2" and node[beta].current == "v1.0"
        finally:
            await swappers.aclose()


async def test_subscribe_follows_each_model_given(make_settings, adapters: list[Path], tmp_path: Path) -> None:
    import asyncio

    from tests import process_tools

    settings = make_settings(metrics={"port": 0})
    alpha, beta, gamma = _names()
    fleets = {name: Fleet(settings, name) for name in (alpha, beta, gamma)}
    await fleets[alpha].produce(fleets[alpha].release(adapters[0], "v1.0"))
    config = process_tools.write_config(settings, tmp_path / "config.yaml")
    log = tmp_path / "subscribe.log"
    args = ["subscribe", "--print-only", "--model", alpha, "--model", beta]
    subscriber = process_tools.start(args, config, log)
    try:
        await wait_for(lambda: f"{alpha} v1.0 ready" in log.read_text(), 60, describe=lambda: log.read_text()[-3000:])
        await fleets[gamma].produce(fleets[gamma].release(adapters[1], "v1.0"))  # not followed
        await fleets[beta].produce(fleets[beta].release(adapters[2], "v1.0"))
        await wait_for(lambda: f"{beta} v1.0 ready" in log.read_text(), 60, describe=lambda: log.read_text()[-3000:])
    finally:
        code = await asyncio.to_thread(process_tools.stop, subscriber)
    assert code == 0 and gamma not in log.read_text(), log.read_text()[-3000:]


async def test_without_models_the_node_follows_the_lines_the_settings_name(make_settings, adapters: list[Path]) -> None:
    alpha, beta, gamma = _names()
    settings = make_settings(models=[{"name": alpha}, {"name": beta}, {"pattern": f"{gamma}*"}])
    fleet = Fleet(settings, beta)
    await fleet.produce(fleet.release(adapters[0], "v1.0"))
    async with Subscribers(settings, lambda line: CallbackSwapper(lambda *args: None)) as node:
        assert list(node.lines) == [alpha, beta]  # a pattern names no line to follow
        assert (node[alpha].current, node[beta].current) == (None, "v1.0")
