"""`streamengine subscribe`: one serving node's subscriber process, its swapper chosen by the settings."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import start_http_server

from streamengine.config.settings import Settings
from streamengine.errors import ConfigError
from streamengine.serving.http import HttpSwapper
from streamengine.serving.subscriber import Subscriber
from streamengine.serving.swappers import CallbackSwapper, PeftSwapper, Swapper

log = logging.getLogger(__name__)


def _announce(model: str, version: str, folder: Path) -> None:
    print(f"{model} {version} ready in {folder}", flush=True)


def build_swapper(settings: Settings, base: str | None = None, kind: str | None = None) -> Swapper:
    """The swapper ``serving.swapper`` (or ``kind``) names: peft, vllm, sglang, max or print."""
    serving = settings.serving
    kind = kind or serving.swapper
    if kind == "print":
        return CallbackSwapper(_announce)
    if kind in ("vllm", "sglang", "max"):
        return HttpSwapper(
            serving.server_url,
            kind,
            api_key=serving.api_key.get_secret_value() if serving.api_key else None,
            local_dir=Path(serving.download_dir),
            server_dir=serving.server_adapter_dir,
            timeout_s=serving.request_timeout_s,
        )
    if kind != "peft":
        raise ConfigError(f"serving.swapper (STREAMENGINE_SERVING__SWAPPER): unknown swapper '{kind}'")
    source = base or settings.model.base
    if not source:
        raise ConfigError(
            "no base model to swap adapters into: set model.base (STREAMENGINE_MODEL__BASE) or pass --base,"
            " or choose another serving.swapper (vllm, sglang, max, print)"
        )
    return PeftSwapper(source, hotswap=serving.hotswap)


async def serve_subscriber(
    settings: Settings,
    stop: asyncio.Event,
    model: str | None,
    base: str | None,
    print_only: bool,
    swapper_kind: str | None = None,
) -> None:
    swapper = build_swapper(settings, base, "print" if print_only else swapper_kind)
    if settings.metrics.port:
        start_http_server(settings.metrics.port, addr="0.0.0.0")
    try:
        async with Subscriber(settings, swapper, model):
            await stop.wait()
    finally:
        if isinstance(swapper, HttpSwapper):
            await swapper.aclose()
