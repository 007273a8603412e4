"""`streamengine subscribe`: one serving node's subscriber process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import start_http_server

from streamengine.config import Settings
from streamengine.errors import ConfigError
from streamengine.serving.subscriber import Subscriber
from streamengine.serving.swappers import CallbackSwapper, PeftSwapper, Swapper

log = logging.getLogger(__name__)


def _announce(model: str, version: str, folder: Path) -> None:
    print(f"{model} {version} ready in {folder}", flush=True)


async def serve_subscriber(
    settings: Settings, stop: asyncio.Event, model: str | None, base: str | None, print_only: bool
) -> None:
    swapper: Swapper
    if print_only:
        swapper = CallbackSwapper(_announce)
    else:
        source = base or settings.model.base
        if not source:
            raise ConfigError(
                "no base model to swap adapters into: set model.base (STREAMENGINE_MODEL__BASE)"
                " or pass --base, or use --print-only"
            )
        swapper = PeftSwapper(source)
    if settings.metrics.port:
        start_http_server(settings.metrics.port, addr="0.0.0.0")
    async with Subscriber(settings, swapper, model):
        await stop.wait()
