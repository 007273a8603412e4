"""The streamengine admin HTTP API: health, manual training, training status, adapters, deploy, rollback, the fleet,
forgetting a user, metrics.

Every mutating endpoint (POST, DELETE) requires ``Authorization: Bearer <token>`` when ``api.token``
(``STREAMENGINE_API__TOKEN``) is set, and ``Content-Type: application/json`` when it is not (a web page
cannot send that to another origin without a CORS preflight, which this API never grants); without a
token the API listens on loopback only (`run` refuses to start otherwise). Reads are open (Prometheus
scrapes /metrics) and use a database pool of their own (``database.api_pool_size``), so a flood of
reads cannot take ingest's connections. Every error is JSON ``{"error": <class>, "message": <text>}``
(validation errors add ``details``) with a fitting status: 401 token, 404 unknown model
line/version/route, 409 state conflict, 415 not JSON, 422 invalid request, 503 a dependency down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from streamengine.api.context import EngineContext
from streamengine.api.error_handlers import install_error_handlers
from streamengine.api.routers import adapters, fleet, health, lines, metrics, privacy, training
from streamengine.config.settings import ApiSettings, Settings, is_loopback
from streamengine.errors import ConfigError


def create_app(ctx: EngineContext | None = None) -> FastAPI:
    """The admin API of one engine (``ctx`` None: only to render the OpenAPI document)."""
    app = FastAPI(title="streamengine admin API", version="1", description=__doc__)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (health, training, lines, adapters, fleet, privacy, metrics):
        app.include_router(module.router)
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the admin API (docs/openapi.json is this, as JSON)."""
    return create_app().openapi()


def bind_api_socket(settings: Settings) -> socket.socket:
    """Listen on api.host:api.port now, so a taken port, or an API others could reach without a token, is a clear
    ConfigError before anything starts."""
    _refuse_open_api(settings.api)
    family = socket.AF_INET6 if ":" in settings.api.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.api.host, settings.api.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"api.port (STREAMENGINE_API__PORT): cannot listen on {settings.api.host}:{settings.api.port}:"
            f" {exc.strerror or exc}"
        ) from None
    sock.set_inheritable(True)
    return sock


def _refuse_open_api(api: ApiSettings) -> None:
    """Secure by default: no mutating surface reachable from other machines without authentication."""
    if api.token is None and not is_loopback(api.host):
        raise ConfigError(
            f"api.token (STREAMENGINE_API__TOKEN) is not set but the admin API would listen on {api.host or '*'}:"
            f"{api.port}, reachable from other machines: set a token (e.g. `openssl rand -hex 32`) or listen on "
            "127.0.0.1 (api.host, STREAMENGINE_API__HOST)"
        )


async def serve_api(ctx: EngineContext, sock: socket.socket) -> None:
    """Serve on ``sock`` until ``ctx.stop`` is set (a graceful shutdown closes the listening socket)."""
    config = uvicorn.Config(create_app(ctx), log_level="warning", lifespan="off", access_log=False)
    server = _EmbeddedServer(config)

    async def exit_on_stop() -> None:
        await ctx.stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(exit_on_stop())
    try:
        await server.serve(sockets=[sock])
    except asyncio.CancelledError:
        # Cancelled before a graceful exit: still unregister the listening socket from the loop, or its
        # fd number, reused by a later socket, would be stale in the selector.
        for listener in getattr(server, "servers", []):
            listener.close()
        raise
    finally:
        watcher.cancel()


class _EmbeddedServer(uvicorn.Server):
    """Runs inside the engine's loop: the engine, not uvicorn, owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
