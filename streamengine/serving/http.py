"""Swap adapters in an inference server through its runtime LoRA API: vLLM, SGLang or MAX Serve.

All three take ``POST {"lora_name": ..., "lora_path": ...}`` to load and ``POST {"lora_name": ...}`` to
unload; they differ in paths and in how they list what is loaded:

=========  ============================  ==============================  ====================
server     load                          unload                          loaded adapters
=========  ============================  ==============================  ====================
vLLM       ``/v1/load_lora_adapter``     ``/v1/unload_lora_adapter``     ``GET /v1/models``
SGLang     ``/load_lora_adapter``        ``/unload_lora_adapter``        (tracked here)
MAX Serve  ``/v1/load_lora_adapter``     ``/v1/unload_lora_adapter``     (tracked here)
=========  ============================  ==============================  ====================

Every version is loaded under its own name, ``<model>@<version>`` (a server must never reload other
weights under a name it has served: vLLM would answer from prefix-cache blocks of the old weights).
Clients send that name as the ``model`` of their requests (``current.json`` in the download folder
and the ``streamengine_subscriber_current_version_info`` metric say which it is). After a successful
load the version before the previous one is unloaded; the previous stays loaded for an instant
rollback. ``lora_path`` must be readable by the server: share the download folder with it (set
``serving.server_adapter_dir`` when it is mounted elsewhere there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from streamengine.errors import ServiceUnavailable, StreamEngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerApi:
    name: str
    load_path: str
    unload_path: str
    models_path: str | None = None  # lists loaded adapters (OpenAI-style {"data": [{"id": ...}]})


APIS = {
    "vllm": ServerApi("vLLM", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/models"),
    "sglang": ServerApi("SGLang", "/load_lora_adapter", "/unload_lora_adapter"),
    "max": ServerApi("MAX Serve", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
}


class AdapterRejected(StreamEngineError):
    """The inference server refused to load an adapter (bad files, rank too large...)."""


def lora_name(model: str, version: str) -> str:
    """The name a version is served under: ``tiny-llama@v1.3``."""
    return f"{model}@{version}"


class HttpSwapper:
    """Keeps an inference server on the current version (and the previous one loaded)."""

    def __init__(
        self,
        base_url: str,
        api: str | ServerApi = "vllm",
        *,
        api_key: str | None = None,
        local_dir: Path | None = None,
        server_dir: str = "",
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api = APIS[api] if isinstance(api, str) else api
        self.base_url = base_url.rstrip("/")
        self.local_dir = local_dir.absolute() if local_dir else None
        self.server_dir = server_dir
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)
        self.current: str | None = None
        self.previous: str | None = None
        self.loaded: list[str] = []  # names this swapper loaded, oldest first
        self._model: str | None = None

    def served_name(self, version: str) -> str:
        return lora_name(self._model or "", version)

    def server_path(self, folder: Path) -> str:
        """``folder`` as the server sees it (``server_dir`` replacing ``local_dir``)."""
        folder = folder.absolute()
        if self.local_dir is None or not self.server_dir:
            return str(folder)
        return str(Path(self.server_dir) / folder.relative_to(self.local_dir))

    async def swap(self, model: str, version: str, folder: Path) -> None:
        self._model = model
        name = lora_name(model, version)
        if name not in await self._loaded(model):
            await self._load(name, self.server_path(folder))
        if name in self.loaded:
            self.loaded.remove(name)
        self.loaded.append(name)
        self.previous, self.current = self.current, version
        keep = {name} | ({lora_name(model, self.previous)} if self.previous else set())
        for stale in [n for n in await self._loaded(model) if n not in keep]:
            await self._unload(stale)

    async def lost(self) -> bool:
        """True when the server no longer holds the current version (it restarted); only a server that lists
        its adapters can tell."""
        if self.current is None or self._model is None or self.api.models_path is None:
            return False
        return lora_name(self._model, self.current) not in await self._loaded(self._model)

    async def reconcile(self, folder: Path) -> bool:
        """Load the current version again from ``folder`` if the server lost it; True when it did. (The
        subscriber verifies the folder again before it calls this.)"""
        if not await self.lost():
            return False
        name = lora_name(self._model or "", self.current or "")
        log.warning("%s lost adapter %s (restarted?); loading it again", self.api.name, name)
        await self._load(name, self.server_path(folder))
        return True

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- HTTP ------------------------------------------------------------------------------------
    async def _loaded(self, model: str) -> list[str]:
        """Names of ``model``'s versions the server holds (from the server when it can list them)."""
        prefix = lora_name(model, "")
        if self.api.models_path is None:
            return [n for n in self.loaded if n.startswith(prefix)]
        response = await self._request("GET", self.api.models_path)
        ids = [str(m.get("id")) for m in _json(response).get("data", []) if isinstance(m, dict)]
        self.loaded = [n for n in self.loaded if n in ids] + [n for n in ids if n.startswith(prefix)]
        self.loaded = list(dict.fromkeys(self.loaded))
        return [n for n in ids if n.startswith(prefix)]

    async def _load(self, name: str, path: str) -> None:
        response = await self._request("POST", self.api.load_path, json={"lora_name": name, "lora_path": path})
        message = _message(response)
        if response.is_success and not _says_failure(response):
            log.info("%s loaded adapter %s from %s", self.api.name, name, path)
            return
        if "already" in message.lower():  # loaded before (e.g. before this subscriber restarted)
            log.info("%s already holds adapter %s", self.api.name, name)
            return
        raise AdapterRejected(f"{self.api.name} refused adapter {name} (HTTP {response.status_code}): {message}")

    async def _unload(self, name: str) -> None:
        try:
            response = await self._request("POST", self.api.unload_path, json={"lora_name": name})
        except ServiceUnavailable as exc:
            log.warning("could not unload %s: %s", name, exc)
            return
        if response.is_success or response.status_code == 404:
            if name in self.loaded:
                self.loaded.remove(name)
            log.info("%s unloaded adapter %s", self.api.name, name)
        else:
            log.warning("%s did not unload %s (HTTP %d): %s", self.api.name, name, response.status_code,
                        _message(response))  # fmt: skip

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(self.api.name, self.base_url, f"{method} {path}: {type(exc).__name__}") from None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _says_failure(response: httpx.Response) -> bool:
    """SGLang answers ``{"success": false, ...}``, MAX ``{"status": "error"...}``; vLLM plain text."""
    data = _json(response)
    return data.get("success") is False or data.get("status") not in (None, "success", "ok")


def _message(response: httpx.Response) -> str:
    data = _json(response)
    error = data.get("error")
    if isinstance(error, dict):  # vLLM >= 0.9: {"error": {"message": ...}}
        return str(error.get("message", ""))[:300]
    for key in ("message", "error_message", "detail", "error"):
        if data.get(key):
            return str(data[key])[:300]
    return response.text[:300]
