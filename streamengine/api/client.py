"""A small client of the admin HTTP API, used by the CLI's operational commands.

HTTP errors become :mod:`streamengine.errors` exceptions, so the CLI's exit codes follow the API's
status codes: 401/415/422 -> 2 (setting or usage), 404 -> 4, 409 -> 5, 503 or unreachable -> 3, else 1.
"""

from __future__ import annotations

from typing import Any

import httpx

from streamengine.config.settings import Settings
from streamengine.errors import ConfigError, Conflict, NotFound, ServiceUnavailable, StreamEngineError


class Unauthorized(ConfigError):
    """The admin API refused the bearer token (api.token, STREAMENGINE_API__TOKEN)."""


class Rejected(ConfigError):
    """The admin API refused the request as invalid (HTTP 422) or not JSON (HTTP 415)."""


class EngineDegraded(ServiceUnavailable):
    """The admin API answered 503: the engine runs but a dependency is down."""

    def __init__(self, base_url: str, message: str) -> None:
        StreamEngineError.__init__(self, message)
        self.service = "engine"
        self.target = base_url


_BY_STATUS: dict[int, type[StreamEngineError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    415: Rejected,
    422: Rejected,
}


class AdminClient:
    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self.base_url = settings.api.base_url()
        token = settings.api.token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202), **kwargs: Any
    ) -> httpx.Response:
        """``method`` on ``path``; a mutating one always says JSON (the API refuses other types without a token)."""
        if method not in ("GET", "HEAD"):
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", {})}
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable("admin API", self.base_url, type(exc).__name__) from None
        if response.status_code not in ok:
            try:
                message = response.json().get("message") or response.text
            except (ValueError, AttributeError):
                message = response.text
            text = f"{method} {path}: HTTP {response.status_code}: {message}"
            if response.status_code == 503:
                raise EngineDegraded(self.base_url, text)
            raise _BY_STATUS.get(response.status_code, StreamEngineError)(text)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("POST", path, json=body, params=clean).json()
