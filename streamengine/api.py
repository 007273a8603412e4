"""The admin HTTP API (FastAPI): health, train, adapters, deploy, rollback, training status, metrics.

Mutating endpoints require ``Authorization: Bearer <STREAMENGINE_API_TOKEN>`` when a token is set.
Errors are JSON ``{"error": <class>, "message": <text>}`` with a fitting status code.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from streamengine.engine import EngineContext
from streamengine.errors import Conflict, NotFound, ServiceUnavailable, StreamEngineError
from streamengine.store import jobs as job_store
from streamengine.store import registry, windows

log = logging.getLogger(__name__)

_STATUS = {NotFound: 404, Conflict: 409, ServiceUnavailable: 503}


class Check(BaseModel):
    ok: bool
    detail: str = ""


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    checks: dict[str, Check]


class TrainRequest(BaseModel):
    model: str | None = Field(None, description="Model line (default: the configured one).")
    min_samples: int = Field(1, ge=1, description="Refuse when the open window holds fewer samples.")


class TrainResponse(BaseModel):
    job_id: int
    window_id: int
    samples: int
    weight: float


class AdapterInfo(BaseModel):
    model: str
    version: str
    parent_version: str | None
    uri: str
    size_bytes: int
    created_at: datetime
    aliases: list[str]
    reason: str | None
    metrics: dict[str, Any]
    window: dict[str, Any] | None


class ReleaseResponse(BaseModel):
    model: str
    version: str
    reason: str
    event_id: str


class JobInfo(BaseModel):
    id: int
    model: str
    window_id: int
    reason: str
    state: str
    attempts: int
    version: str | None
    parent_version: str | None
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TrainingStatus(BaseModel):
    model: str
    open_window: dict[str, Any] | None
    production: str | None
    jobs: list[JobInfo]


def create_app(ctx: EngineContext) -> FastAPI:
    settings = ctx.settings
    app = FastAPI(title="streamengine admin API", version="1", description=__doc__)

    @app.exception_handler(StreamEngineError)
    async def _error(_: Request, exc: StreamEngineError) -> JSONResponse:
        code = next((c for cls, c in _STATUS.items() if isinstance(exc, cls)), 400)
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=code)

    def authorize(authorization: str | None = Header(None)) -> None:
        token = settings.api.token
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"error": "Unauthorized", "message": "missing or wrong bearer token (STREAMENGINE_API_TOKEN)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def model_of(model: str | None) -> str:
        name = model or settings.model.name
        if name != settings.model.name:
            raise NotFound(f"model line '{name}' is not configured here")
        return name

    @app.get("/health", response_model=Health)
    async def health() -> JSONResponse:
        checks = {
            "postgres": await _check(ctx.db.ping()),
            "kafka": await _check(_kafka_ping(ctx)),
            "s3": await _check(ctx.store.aping()),
        }
        ok = all(c.ok for c in checks.values())
        body = Health(status="ok" if ok else "degraded", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.post("/train", response_model=TrainResponse, status_code=202, dependencies=[Depends(authorize)])
    async def train(request: TrainRequest | None = None) -> TrainResponse:
        request = request or TrainRequest()
        model = model_of(request.model)
        closed = await windows.close_now(ctx.db, model, "manual", request.min_samples)
        if closed is None:
            raise Conflict(f"the open window of '{model}' holds fewer than {request.min_samples} trainable samples")
        return TrainResponse(
            job_id=closed.job_id, window_id=closed.window_id, samples=closed.samples, weight=closed.weight
        )

    @app.get("/adapters", response_model=list[AdapterInfo])
    async def list_adapters(model: str | None = None) -> list[dict[str, Any]]:
        return [a.as_dict() for a in await registry.list_adapters(ctx.db, model_of(model))]

    @app.get("/adapters/{version}", response_model=AdapterInfo)
    async def adapter_info(version: str, model: str | None = None) -> dict[str, Any]:
        return (await registry.get_adapter(ctx.db, model_of(model), version)).as_dict()

    @app.post("/adapters/{version}/deploy", response_model=ReleaseResponse, dependencies=[Depends(authorize)])
    async def deploy(version: str, model: str | None = None) -> ReleaseResponse:
        event = await registry.deploy(ctx.db, model_of(model), version, settings.kafka.released_topic, _key(ctx))
        return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)

    @app.post("/adapters/rollback", response_model=ReleaseResponse, dependencies=[Depends(authorize)])
    async def rollback(model: str | None = None) -> ReleaseResponse:
        event = await registry.rollback(ctx.db, model_of(model), settings.kafka.released_topic, _key(ctx))
        return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)

    @app.get("/training/status", response_model=TrainingStatus)
    async def training_status(model: str | None = None, limit: int = 20) -> TrainingStatus:
        name = model_of(model)
        window = await ctx.db.fetchrow(
            "SELECT id, samples, weight, stored, opened_at FROM windows WHERE model = $1 AND state = 'open'", name
        )
        jobs = await job_store.list_jobs(ctx.db, name, limit)
        return TrainingStatus(
            model=name,
            open_window=dict(window) if window else None,
            production=await registry.alias(ctx.db, name, "production"),
            jobs=[JobInfo(**{k: getattr(j, k) for k in JobInfo.model_fields}) for j in jobs],
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Unauthorized(Exception):
    pass


def _key(ctx: EngineContext) -> str | None:
    key = ctx.settings.signing_key
    return key.get_secret_value() if key else None


async def _check(probe: Any) -> Check:
    try:
        result = await probe
    except StreamEngineError as exc:
        return Check(ok=False, detail=str(exc))
    except Exception as exc:
        return Check(ok=False, detail=type(exc).__name__)
    if result is False:
        return Check(ok=False, detail="not reachable")
    return Check(ok=True)


async def _kafka_ping(ctx: EngineContext) -> bool:
    client = ctx.producer.client
    node = client.get_random_node() if hasattr(client, "get_random_node") else None
    if node is None:
        return await client.bootstrap() is None
    return bool(await client.ready(node))


async def serve_api(ctx: EngineContext) -> None:
    config = uvicorn.Config(
        create_app(ctx), host=ctx.settings.api.host, port=ctx.settings.api.port, log_level="warning", lifespan="off"
    )
    server = _EmbeddedServer(config)
    try:
        await server.serve()
    finally:
        server.should_exit = True


class _EmbeddedServer(uvicorn.Server):
    """Runs inside the engine's loop: the engine, not uvicorn, owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
