"""Every error of the admin API as JSON ``{"error": <class>, "message": <text>}`` with a fitting status."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from streamengine.api.dependencies import NotJson, Unauthorized
from streamengine.api.models import ErrorBody
from streamengine.errors import (
    ConfigError,
    Conflict,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    StreamEngineError,
)

log = logging.getLogger(__name__)

_STATUS: dict[type[StreamEngineError], int] = {
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    ConfigError: 400,
    IntegrityError: 500,
}


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=error, message=message, **extra)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, no token or JSON type, invalid requests, unknown routes and dead dependencies to JSON."""

    @app.exception_handler(StreamEngineError)
    async def _domain(_: Request, exc: StreamEngineError) -> JSONResponse:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
        return _error(status, type(exc).__name__, str(exc))

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, __: Unauthorized) -> JSONResponse:
        response = _error(401, "Unauthorized", "missing or wrong bearer token (api.token, STREAMENGINE_API__TOKEN)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(NotJson)
    async def _not_json(_: Request, __: NotJson) -> JSONResponse:
        message = "send Content-Type: application/json (no api.token is set, so that is what keeps web pages out)"
        return _error(415, "UnsupportedMediaType", message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details) or "invalid request"
        return _error(422, "ValidationError", message, details=details)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        names = {404: "NotFound", 405: "MethodNotAllowed"}
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = _error(exc.status_code, names.get(exc.status_code, "HTTPError"), message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.TooManyConnectionsError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(OSError)
    @app.exception_handler(TimeoutError)
    async def _unreachable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error(503, "ServiceUnavailable", f"a dependency is unreachable ({type(exc).__name__}); see GET /health")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "InternalError", f"internal error ({type(exc).__name__}); see the engine's log")
