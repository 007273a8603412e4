"""A small client of the admin HTTP API, used by the CLI's operational commands."""

from __future__ import annotations

from typing import Any

import httpx

from streamengine.config import Settings
from streamengine.errors import Conflict, NotFound, ServiceUnavailable, StreamEngineError

_BY_STATUS: dict[int, type[StreamEngineError]] = {404: NotFound, 409: Conflict}


class AdminClient:
    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self.base_url = settings.api.base_url()
        token = settings.api.token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202), **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable("admin API", self.base_url, type(exc).__name__) from None
        if response.status_code not in ok:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            error = _BY_STATUS.get(response.status_code, StreamEngineError)
            raise error(f"{method} {path}: HTTP {response.status_code}: {message}")
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("POST", path, json=body, params=clean).json()
