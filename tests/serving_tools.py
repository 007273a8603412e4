"""Helpers for serving-node tests: adapters to swap, the publishing side that releases them, and a stand-in
for an inference server's runtime LoRA API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased, LoraSpec
from streamengine.core.manifest import Signer
from streamengine.core.release import build_release
from streamengine.local.embedded import free_port
from streamengine.store.objects import ObjectStore
from tests.polling import wait_for
from tests.training_tools import TARGETS


def make_adapter(tiny_model: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A fresh LoRA on the tiny model with random lora_B, so each adapter changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out))
    return out


class Fleet:
    """The publishing side of one test: uploads adapter folders and produces AdapterReleased records."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.store = ObjectStore.from_settings(settings.storage)
        self.store.ensure_bucket()

    def release(
        self,
        folder: Path,
        version: str,
        *,
        key: str | None = None,
        reason: str = "threshold",
        signer: Signer | None = None,
        file_sizes: dict[str, int] | None = None,
    ) -> AdapterReleased:
        """Upload ``folder`` as ``version`` and build its record, signed with ``signer`` (or the HMAC ``key``)."""
        hashes = self.store.upload_folder(folder, self.model, version)
        return build_release(
            model=self.model,
            version=version,
            parent_version=None,
            base_model="tiny",
            uri=self.store.uri(self.model, version),
            files=hashes,
            size_bytes=sum(p.stat().st_size for p in folder.iterdir()),
            lora=LoraSpec(r=4, alpha=8, target_modules=TARGETS),
            ewc_lambda=500.0,
            window=None,
            metrics={},
            reason=reason,  # type: ignore[arg-type]
            now=datetime.now(UTC),
            signer=signer or (Signer(hmac_key=key) if key else None),
            file_sizes=file_sizes,
        )

    async def produce(self, *values: AdapterReleased | bytes | None, key: str | None = None) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            for value in values:
                raw = value.model_dump_json().encode() if isinstance(value, AdapterReleased) else value
                await producer.send_and_wait(
                    self.settings.kafka.released_topic, value=raw, key=(key or self.model).encode()
                )
        finally:
            await producer.stop()

    async def create_topic(self, partitions: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.settings.kafka.released_topic, partitions, 1)])
        finally:
            await admin.close()


BASE = "base-model"


class FakeLoraServer:
    """Stands in for vLLM / SGLang / MAX Serve, on 127.0.0.1 at a free port: the runtime LoRA endpoints as the
    servers document them (vLLM: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` with
    ``{"lora_name", "lora_path"}``, plain-text success, 400 when a name is already loaded, 404 when the
    adapter or name is unknown, ``GET /v1/models`` listing loaded adapters; SGLang: the same without
    ``/v1`` and answering ``{"success": ...}``; MAX Serve: ``/v1/...`` answering ``{"status": ...}``), plus
    ``POST /v1/completions`` answering only for a loaded model name."""

    def __init__(self, flavour: str = "vllm", api_key: str | None = None) -> None:
        self.flavour, self.api_key = flavour, api_key
        self.loaded: dict[str, str] = {}  # name -> path
        self.calls: list[tuple[str, str]] = []  # (endpoint, lora_name)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._build()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _ok(self, message: str) -> Response:
        if self.flavour == "sglang":
            return JSONResponse({"success": True, "error_message": "", "loaded_adapters": dict(self.loaded)})
        if self.flavour == "max":
            return JSONResponse({"status": "success", "message": message})
        return PlainTextResponse(f"Success: {message}")

    def _error(self, message: str, status: int) -> Response:
        if self.flavour == "sglang":
            return JSONResponse({"success": False, "error_message": message}, status_code=status)
        if self.flavour == "max":
            return JSONResponse({"status": "error", "message": message}, status_code=status)
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)

    def _build(self) -> FastAPI:
        app = FastAPI()
        prefix = "" if self.flavour == "sglang" else "/v1"

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            response: Response = await call_next(request)
            return response

        @app.post(prefix + "/load_lora_adapter")
        async def load(body: dict[str, Any]) -> Response:
            name, path = body.get("lora_name"), body.get("lora_path")
            self.calls.append(("load", str(name)))
            if not name or not path:
                return self._error("Both 'lora_name' and 'lora_path' must be provided.", 400)
            if name in self.loaded:
                return self._error(f"The lora adapter '{name}' has already been loaded.", 400)
            if not (Path(path) / "adapter_config.json").is_file():
                return self._error(f"Loading lora {name} failed: No adapter found for {path}", 404)
            json.loads((Path(path) / "adapter_config.json").read_text())
            self.loaded[name] = path
            return self._ok(f"LoRA adapter '{name}' added successfully.")

        @app.post(prefix + "/unload_lora_adapter")
        async def unload(body: dict[str, Any]) -> Response:
            name = str(body.get("lora_name"))
            self.calls.append(("unload", name))
            if self.loaded.pop(name, None) is None:
                return self._error(f"The lora adapter '{name}' cannot be found.", 404)
            return self._ok(f"LoRA adapter '{name}' removed successfully.")

        if self.flavour == "vllm":

            @app.get("/v1/models")
            async def models() -> dict[str, Any]:
                cards = [{"id": BASE, "object": "model", "root": BASE}]
                cards += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.loaded.items()]
                return {"object": "list", "data": cards}

        @app.post("/v1/completions")
        async def completions(body: dict[str, Any]) -> Response:
            model = body.get("model")
            if model != BASE and model not in self.loaded:
                return self._error(f"The model `{model}` does not exist.", 404)
            return JSONResponse({"model": model, "choices": [{"text": f"answer from {model}"}]})

        return app

    def restart(self) -> None:
        """What a restart does to runtime-loaded adapters: they are gone."""
        self.loaded.clear()

    async def __aenter__(self) -> FakeLoraServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = server = uvicorn.Server(config)
        self._task = asyncio.create_task(server.serve())
        await wait_for(lambda: server.started, 30, interval_s=0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
