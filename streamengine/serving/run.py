"""`streamengine subscribe`: one serving node's subscriber process, its swapper chosen by the settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import start_http_server

from streamengine.config.settings import Settings
from streamengine.errors import ConfigError
from streamengine.serving.http import HttpSwapper
from streamengine.serving.lines import Subscribers
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


class Swappers:
    """The swapper of each followed line: views of one shared in-process model (peft), or one swapper per line
    (an inference server's adapters are named per line and version; print)."""

    def __init__(self, settings: Settings, base: str | None, kind: str | None) -> None:
        self.settings, self.base, self.kind = settings, base, kind
        self.peft: PeftSwapper | None = None
        self.http: list[HttpSwapper] = []

    def __call__(self, model: str) -> Swapper:
        if (self.kind or self.settings.serving.swapper) == "peft":
            if self.peft is None:
                swapper = build_swapper(self.settings, self.base, self.kind)
                assert isinstance(swapper, PeftSwapper)
                self.peft = swapper
            return self.peft.line(model)
        swapper = build_swapper(self.settings, self.base, self.kind)
        if isinstance(swapper, HttpSwapper):
            self.http.append(swapper)
        return swapper

    async def aclose(self) -> None:
        for swapper in self.http:
            await swapper.aclose()


async def serve_subscriber(
    settings: Settings,
    stop: asyncio.Event,
    models: Sequence[str],
    base: str | None,
    print_only: bool,
    swapper_kind: str | None = None,
    every_line: bool = False,
) -> None:
    """Follow ``models`` (the lines the settings name when none), or with ``every_line`` every line released on
    ``base`` (default model.base), each hot-swapped by the swapper ``swapper_kind`` (default serving.swapper) names."""
    lines_of = (base or settings.model.base) if every_line else None
    if every_line and not lines_of:
        raise ConfigError("--every-line: name the base model whose lines to follow (--base or model.base)")
    swappers = Swappers(settings, base, "print" if print_only else swapper_kind)
    if settings.metrics.port:
        start_http_server(settings.metrics.port, addr="0.0.0.0")
    try:
        async with Subscribers(settings, swappers, models, base=lines_of):
            await stop.wait()
    finally:
        await swappers.aclose()
