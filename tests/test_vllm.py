"""The HTTP swapper against a local stand-in for vLLM (and for SGLang and MAX Serve), over real HTTP.

``FakeLoraServer`` (tests/serving_tools.py) stands in for an inference server: the runtime LoRA endpoints
as the servers document them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamengine.errors import ServiceUnavailable
from streamengine.local.embedded import free_port
from streamengine.serving import HttpSwapper, Subscriber, lora_name
from streamengine.serving.http import AdapterRejected
from tests.serving_tools import FakeLoraServer, Fleet


def _adapter(root: Path, version: str) -> Path:
    folder = root / "m" / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


@pytest.fixture
async def vllm() -> AsyncIterator[FakeLoraServer]:
    async with FakeLoraServer("vllm", api_key="vllm-key") as server:
        yield server


async def test_vllm_swapper_loads_each_version_under_its_own_name(vllm: FakeLoraServer, tmp_path: Path) -> None:
    folders = {v: _adapter(tmp_path, v) for v in ("v1.0", "v1.1", "v1.2", "v1.3")}
    swapper = HttpSwapper(vllm.url, "vllm", api_key="vllm-key")
    try:
        for version in ("v1.0", "v1.1", "v1.2"):
            await swapper.swap("m", version, folders[version])
        assert vllm.calls == [
            ("load", "m@v1.0"), ("load", "m@v1.1"), ("load", "m@v1.2"), ("unload", "m@v1.0")
        ]  # fmt: skip
        assert set(vllm.loaded) == {"m@v1.1", "m@v1.2"}  # current and previous
        assert vllm.loaded["m@v1.2"] == str(folders["v1.2"].absolute())
        assert (swapper.current, swapper.previous) == ("v1.2", "v1.1")

        vllm.calls.clear()
        await swapper.swap("m", "v1.1", folders["v1.1"])  # rollback: still loaded, never reloaded
        assert vllm.calls == [] and set(vllm.loaded) == {"m@v1.1", "m@v1.2"}
        await swapper.swap("m", "v1.3", folders["v1.3"])
        assert vllm.calls == [("load", "m@v1.3"), ("unload", "m@v1.2")]
        assert set(vllm.loaded) == {"m@v1.3", "m@v1.1"}

        # A subscriber that restarts finds its versions on the server and does not load them again.
        again = HttpSwapper(vllm.url, "vllm", api_key="vllm-key")
        vllm.calls.clear()
        await again.swap("m", "v1.3", folders["v1.3"])
        assert vllm.calls == [("unload", "m@v1.1")]  # only the current one is known to be wanted
        await again.aclose()

        # The server restarted and lost its runtime adapters: reconcile loads the current one again.
        vllm.restart()
        assert await swapper.reconcile(folders["v1.3"]) is True
        assert set(vllm.loaded) == {"m@v1.3"}
        assert await swapper.reconcile(folders["v1.3"]) is False
    finally:
        await swapper.aclose()


async def test_vllm_swapper_failures_keep_the_current_version(vllm: FakeLoraServer, tmp_path: Path) -> None:
    good = _adapter(tmp_path, "v1.0")
    swapper = HttpSwapper(vllm.url, "vllm", api_key="vllm-key")
    await swapper.swap("m", "v1.0", good)
    with pytest.raises(AdapterRejected, match="No adapter found"):
        await swapper.swap("m", "v1.1", tmp_path / "nowhere")
    assert swapper.current == "v1.0" and set(vllm.loaded) == {"m@v1.0"}
    await swapper.aclose()

    wrong_key = HttpSwapper(vllm.url, "vllm", api_key="not-it")
    with pytest.raises(AdapterRejected, match="401"):
        await wrong_key.swap("m", "v1.0", good)  # /v1/models answers 401 without JSON data: load is refused
    await wrong_key.aclose()

    down = HttpSwapper(f"http://127.0.0.1:{free_port()}", "vllm", timeout_s=2)
    with pytest.raises(ServiceUnavailable, match="vLLM"):
        await down.swap("m", "v1.0", good)
    assert down.current is None
    await down.aclose()


def test_server_path_maps_the_download_dir(tmp_path: Path) -> None:
    swapper = HttpSwapper("http://x", "vllm", local_dir=tmp_path / "adapters", server_dir="/mnt/adapters")
    assert swapper.server_path(tmp_path / "adapters" / "m" / "v1.2") == "/mnt/adapters/m/v1.2"
    plain = HttpSwapper("http://x", "vllm")
    assert plain.server_path(tmp_path / "m" / "v1.2") == str(tmp_path / "m" / "v1.2")


@pytest.mark.parametrize("flavour", ["sglang", "max"])
async def test_sglang_and_max_serve_configurations(flavour: str, tmp_path: Path) -> None:
    folders = {v: _adapter(tmp_path, v) for v in ("v1.0", "v1.1", "v1.2")}
    async with FakeLoraServer(flavour) as server:
        swapper = HttpSwapper(server.url, flavour)
        for version in ("v1.0", "v1.1", "v1.2"):
            await swapper.swap("m", version, folders[version])
        assert server.calls == [("load", "m@v1.0"), ("load", "m@v1.1"), ("load", "m@v1.2"), ("unload", "m@v1.0")]
        assert set(server.loaded) == {"m@v1.1", "m@v1.2"}
        server.loaded["m@v1.9"] = "/elsewhere"  # loaded before this subscriber started: "already loaded"
        await swapper.swap("m", "v1.9", folders["v1.0"])
        assert swapper.current == "v1.9"
        with pytest.raises(AdapterRejected, match="No adapter found"):
            await swapper.swap("m", "v2.0", tmp_path / "nowhere")
        await swapper.aclose()


@pytest.mark.integration
async def test_subscriber_drives_vllm_end_to_end(make_settings, tmp_path: Path, vllm: FakeLoraServer) -> None:
    import httpx

    settings = make_settings(serving={"swapper": "vllm", "server_url": vllm.url, "api_key": "vllm-key"})
    fleet = Fleet(settings, "tiny-llama")
    adapters = [_adapter(tmp_path / "out", v) for v in ("v1.0", "v1.1", "v1.2")]
    await fleet.produce(fleet.release(adapters[0], "v1.0"))
    from streamengine.serving.run import build_swapper

    swapper = build_swapper(settings)
    assert isinstance(swapper, HttpSwapper)
    async with Subscriber(settings, swapper) as sub:
        assert sub.current == "v1.0" and set(vllm.loaded) == {"tiny-llama@v1.0"}
        for i, version in enumerate(("v1.1", "v1.2"), 1):
            await fleet.produce(fleet.release(adapters[i], version))
            await sub.wait_for_version(version, 20)
        assert set(vllm.loaded) == {"tiny-llama@v1.1", "tiny-llama@v1.2"}
        path = Path(vllm.loaded["tiny-llama@v1.2"])
        assert path == (sub.download_dir / "v1.2").absolute() and (path / "adapter_model.safetensors").is_file()
        # A client (or router) reads the served name and asks for it.
        current = json.loads((sub.download_dir / "current.json").read_text())
        assert current["served_name"] == lora_name("tiny-llama", "v1.2")
        async with httpx.AsyncClient(headers={"Authorization": "Bearer vllm-key"}) as client:
            answer = await client.post(f"{vllm.url}/v1/completions", json={"model": current["served_name"]})
        assert answer.json()["choices"][0]["text"] == "answer from tiny-llama@v1.2"
    await swapper.aclose()


def test_build_swapper_from_settings(tmp_path: Path) -> None:
    from streamengine.config.settings import load_settings
    from streamengine.errors import ConfigError
    from streamengine.serving import CallbackSwapper, PeftSwapper
    from streamengine.serving.run import build_swapper

    serving = {"download_dir": tmp_path, "server_url": "http://vllm:8000", "server_adapter_dir": "/mnt/a"}
    for kind, paths in (("vllm", "/v1/load_lora_adapter"), ("sglang", "/load_lora_adapter"),
                        ("max", "/v1/load_lora_adapter")):  # fmt: skip
        swapper = build_swapper(load_settings(serving={**serving, "swapper": kind}))
        assert isinstance(swapper, HttpSwapper) and swapper.api.load_path == paths
        assert swapper.base_url == "http://vllm:8000"
        assert swapper.server_path(tmp_path / "m" / "v1.0") == "/mnt/a/m/v1.0"
    assert isinstance(build_swapper(load_settings(serving={"swapper": "print"})), CallbackSwapper)
    assert isinstance(build_swapper(load_settings(), base="/models/x"), PeftSwapper)
    assert isinstance(build_swapper(load_settings(serving={"swapper": "vllm"}), kind="print"), CallbackSwapper)
    with pytest.raises(ConfigError, match="STREAMENGINE_MODEL__BASE"):
        build_swapper(load_settings(model={"base": ""}))
