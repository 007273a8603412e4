"""SIGKILL a serving node's `streamengine subscribe` mid-download; it restarts clean and converges.

The subscriber (PEFT swapper on the tiny model) reaches S3 through a proxy that lets 1.5 MiB of the
2 MiB adapter through and then holds the rest, so the process is killed with a half-written file on
disk. After the restart nothing half-written is used or left behind, and the node serves the latest
release, downloaded again in full and verified.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from streamengine.core.manifest import serving_files
from streamengine.store.folders import verify
from tests import process_tools
from tests.faults.stall_proxy import StallProxy
from tests.polling import wait_for
from tests.serving_tools import Fleet, make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-llama"
MIB = 1 << 20


def _serving(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / "current.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


async def _serves(folder: Path, version: str) -> bool:
    return _serving(folder) == version


def _partial_files(folder: Path) -> list[Path]:
    return list(folder.glob(".v1.1.*/adapter_model.safetensors"))


async def _partial_at_least(folder: Path, size: int) -> bool:
    return any(p.stat().st_size >= size for p in _partial_files(folder))


async def test_subscriber_killed_mid_download_restarts_clean_and_converges(
    services: Any, make_settings: Any, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(model={"base": str(tiny_model)})
    fleet = Fleet(settings, MODEL)
    small = make_adapter(tiny_model, tmp_path / "small", seed=0)
    big = make_adapter(tiny_model, tmp_path / "big", seed=1, r=512)  # ~2 MiB of weights
    full_size = (big / "adapter_model.safetensors").stat().st_size
    assert full_size > 2 * MIB
    folder = Path(settings.serving.download_dir) / MODEL
    trigger = f"GET /{settings.storage.bucket}/{MODEL}/v1.1/adapter_model.safetensors".encode()
    subscriber = None
    try:
        async with StallProxy(services.s3_endpoint, trigger, response_bytes=3 * MIB // 2) as proxy:
            proxied = make_settings(model={"base": str(tiny_model)}, storage={"endpoint": proxy.endpoint})
            config = process_tools.write_config(proxied, tmp_path / "proxied.yaml")
            await fleet.produce(fleet.release(small, "v1.0"))
            subscriber = process_tools.start(["subscribe"], config, tmp_path / "first.log")
            await wait_for(lambda: _serves(folder, "v1.0"), timeout_s=120)

            v11 = fleet.release(big, "v1.1")
            await fleet.produce(v11)
            await asyncio.wait_for(proxy.stalled.wait(), 60)
            # The first MiB is written to the temporary folder; the rest never arrives.
            await wait_for(lambda: _partial_at_least(folder, MIB), timeout_s=30)
            process_tools.kill(subscriber)

        partial = _partial_files(folder)
        partial_size = partial[0].stat().st_size if len(partial) == 1 else 0
        assert MIB <= partial_size < full_size
        assert _serving(folder) == "v1.0" and not (folder / "v1.1").exists()

        config = process_tools.write_config(settings, tmp_path / "direct.yaml")
        restarted = time.monotonic()
        subscriber = process_tools.start(["subscribe"], config, tmp_path / "second.log")
        await wait_for(lambda: _serves(folder, "v1.1"), timeout_s=120)
        converge_s = time.monotonic() - restarted
        assert sorted(p.name for p in folder.iterdir()) == ["current.json", "v1.1"]  # leftovers removed
        assert verify(folder / "v1.1", serving_files(v11.files)) is None
        assert process_tools.stop(subscriber) == 0
    finally:
        if subscriber is not None:
            process_tools.kill(subscriber)
    log = (tmp_path / "second.log").read_text()
    assert "removed 1 leftovers of an interrupted download" in log, log[-3000:]
    assert f"now serving adapter {MODEL} v1.1" in log and "refused" not in log, log[-3000:]
    print(
        f"\nkilled with {partial_size} of {full_size} bytes written; restarted node served v1.1 after {converge_s:.1f}s"
    )
