"""The streamengine admin HTTP API: health, manual training, training status, adapters, deploy, rollback, forgetting
a user, metrics.

Every mutating endpoint (POST) requires ``Authorization: Bearer <token>`` when ``api.token``
(``STREAMENGINE_API__TOKEN``) is set; reads are open (Prometheus scrapes /metrics). Every error is JSON
``{"error": <class>, "message": <text>}`` (validation errors add ``details``) with a fitting status:
401 token, 404 unknown model line/version/route, 409 state conflict, 422 invalid request, 503 a
dependency down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Annotated, Any

import asyncpg
import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from streamengine import metrics
from streamengine.api.context import EngineContext
from streamengine.api.models import (
    AdapterInfo,
    Check,
    ErrorBody,
    FisherRequest,
    FisherResponse,
    ForgetRequest,
    ForgetResponse,
    Health,
    JobInfo,
    JobProgress,
    Liveness,
    OpenWindow,
    ReleaseResponse,
    TrainingStatus,
    TrainRequest,
    TrainResponse,
)
from streamengine.config.settings import Settings
from streamengine.core.masking import redact, settings_secrets
from streamengine.errors import (
    ConfigError,
    Conflict,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    StreamEngineError,
)
from streamengine.store import job_queue, privacy, registry, windows

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 3.0
"""Each dependency probe of GET /health gives up after this long (a dead dependency answers 503 fast)."""

_STATUS: dict[type[StreamEngineError], int] = {
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    ConfigError: 400,
    IntegrityError: 500,
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [(404, "Unknown model line, version or alias"), (422, "Invalid request")]
}
_MUTATING: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    409: {"model": ErrorBody, "description": "Conflicts with the current state"},
}
_bearer = HTTPBearer(auto_error=False, description="api.token (STREAMENGINE_API__TOKEN), when set")

ModelParam = Annotated[str | None, Query(max_length=200, description="Model line (default: model.name of the engine).")]
VersionParam = Annotated[
    str,
    Path(
        max_length=64,
        pattern=r"^(v\d+\.\d+|[a-z][a-z0-9_-]*)$",
        description="A version (v1.2) or an alias (production, previous).",
    ),
]


class _Unauthorized(Exception):
    pass


def _engine(request: Request) -> EngineContext:
    ctx: EngineContext | None = request.app.state.ctx
    if ctx is None:
        raise ServiceUnavailable("engine", "admin API", "not connected")
    return ctx


Ctx = Annotated[EngineContext, Depends(_engine)]


def authorize(ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Refuse a mutating request without the configured bearer token (constant-time comparison)."""
    token = ctx.settings.api.token
    if token is None:
        return
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise _Unauthorized()


def model_of(ctx: EngineContext, model: str | None) -> str:
    name = model or ctx.settings.model.name
    if name != ctx.settings.model.name:
        raise NotFound(f"model line '{name}' is not configured here (model.name is '{ctx.settings.model.name}')")
    return name


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=error, message=message, **extra)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StreamEngineError)
    async def _domain(_: Request, exc: StreamEngineError) -> JSONResponse:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
        return _error(status, type(exc).__name__, str(exc))

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        response = _error(401, "Unauthorized", "missing or wrong bearer token (api.token, STREAMENGINE_API__TOKEN)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

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


def create_app(ctx: EngineContext | None = None) -> FastAPI:
    """The admin API of one engine (``ctx`` None: only to render the OpenAPI document)."""
    app = FastAPI(title="streamengine admin API", version="1", description=__doc__)
    app.state.ctx = ctx
    _install_error_handlers(app)
    mutating: dict[str, Any] = {"dependencies": [Depends(authorize)], "responses": _MUTATING}

    @app.get("/health/live", response_model=Liveness, tags=["health"])
    async def live() -> Liveness:
        """Liveness: the process answers (use for a livenessProbe; it does not look at dependencies)."""
        return Liveness()

    @app.get("/health", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    async def health(ctx: Ctx) -> JSONResponse:
        """Readiness: Kafka, PostgreSQL and S3 probed concurrently (each within 3 s), ingest and background loops."""
        names = ("kafka", "postgres", "s3")
        probes = await asyncio.gather(
            _probe(ctx, _kafka_ping(ctx)), _probe(ctx, ctx.db.ping()), _probe(ctx, ctx.store.aping())
        )
        checks = dict(zip(names, probes, strict=True))
        checks["ingest"] = _ingest_check(ctx)
        dead = [name for name, task in ctx.tasks.items() if task.done()]
        checks["engine"] = Check(ok=not dead, detail=", ".join(f"{n} stopped" for n in dead), seconds=0.0)
        ok = all(c.ok for c in checks.values())
        body = Health(status="ok" if ok else "degraded", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.post("/train", response_model=TrainResponse, status_code=202, tags=["training"], **mutating)
    async def train(
        ctx: Ctx,
        request: TrainRequest | None = None,
        major: Annotated[bool, Query(description="Release the next major version (vN+1.0).")] = False,
    ) -> TrainResponse:
        """Close the model line's open window now and queue a training job (reason `manual`)."""
        request = request or TrainRequest()
        model = model_of(ctx, request.model)
        closed = await windows.close_now(ctx.db, model, "manual", request.min_samples)
        if closed is None:
            raise Conflict(f"the open window of '{model}' holds fewer than {request.min_samples} trainable samples")
        if major:
            await job_queue.request_major(ctx.db, closed.job_id)
        metrics.WINDOWS_CLOSED.labels(model, "manual").inc()
        log.info("manual train: window %d of %s closed -> job %d", closed.window_id, model, closed.job_id)
        return TrainResponse(
            model=model, job_id=closed.job_id, window_id=closed.window_id, samples=closed.samples, weight=closed.weight
        )

    @app.post("/fisher/calculate", response_model=FisherResponse, status_code=202, tags=["training"], **mutating)
    async def fisher_calculate(ctx: Ctx, request: FisherRequest | None = None) -> FisherResponse:
        """Queue a job computing the Fisher of a released version (online EWC) and storing it beside it."""
        request = request or FisherRequest()
        model = model_of(ctx, request.model)
        version = (await registry.get_adapter(ctx.db, model, request.version)).version
        job_id = await job_queue.enqueue_fisher(ctx.db, model, version)
        log.info("Fisher of %s %s requested -> job %d", model, version, job_id)
        return FisherResponse(model=model, version=version, job_id=job_id)

    @app.get("/training/status", response_model=TrainingStatus, tags=["training"], responses=_ERRORS)
    async def training_status(
        ctx: Ctx,
        model: ModelParam = None,
        limit: Annotated[int, Query(ge=1, le=500, description="How many recent jobs.")] = 20,
    ) -> TrainingStatus:
        """The open window, production version, next tick and recent jobs (running ones with progress)."""
        name = model_of(ctx, model)
        window = await ctx.db.fetchrow(
            "SELECT id, samples, weight, stored, opened_at FROM windows WHERE model = $1 AND state = 'open'", name
        )
        last_tick = await ctx.db.fetchval("SELECT last_tick_at FROM model_lines WHERE model = $1", name)
        counts = await ctx.db.fetch("SELECT state, count(*) AS n FROM jobs WHERE model = $1 GROUP BY state", name)
        jobs = await job_queue.list_jobs(ctx.db, name, limit)
        return TrainingStatus(
            model=name,
            production=await registry.alias(ctx.db, name, "production"),
            previous=await registry.alias(ctx.db, name, "previous"),
            open_window=OpenWindow(**dict(window)) if window else None,
            last_tick_at=last_tick,
            next_tick_at=ctx.schedule.next_after(last_tick) if ctx.schedule and last_tick else None,
            jobs_by_state={r["state"]: r["n"] for r in counts},
            jobs=[
                JobInfo(
                    **{k: getattr(j, k) for k in JobInfo.model_fields if k != "progress"},
                    progress=JobProgress(**(j.progress or {})),
                )
                for j in jobs
            ],
        )

    @app.get("/adapters", response_model=list[AdapterInfo], tags=["adapters"], responses=_ERRORS)
    async def list_adapters(ctx: Ctx, model: ModelParam = None) -> list[dict[str, Any]]:
        """Every version of the model line, newest first, with its aliases and metrics."""
        return [a.as_dict() for a in await registry.list_adapters(ctx.db, model_of(ctx, model))]

    @app.get("/adapters/{version}", response_model=AdapterInfo, tags=["adapters"], responses=_ERRORS)
    async def adapter_info(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> dict[str, Any]:
        """One version, by name or alias."""
        return (await registry.get_adapter(ctx.db, model_of(ctx, model), version)).as_dict()

    @app.post("/adapters/rollback", response_model=ReleaseResponse, tags=["adapters"], **mutating)
    async def rollback(ctx: Ctx, model: ModelParam = None) -> ReleaseResponse:
        """Make `previous` the production version again and announce it (reason `rollback`)."""
        event = await registry.rollback(ctx.db, model_of(ctx, model), ctx.settings.kafka.released_topic, _key(ctx))
        return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)

    @app.post("/adapters/{version}/deploy", response_model=ReleaseResponse, tags=["adapters"], **mutating)
    async def deploy(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> ReleaseResponse:
        """Make a version the production adapter and announce it on adapter.released (reason `manual`)."""
        name = model_of(ctx, model)
        event = await registry.deploy(ctx.db, name, version, ctx.settings.kafka.released_topic, _key(ctx))
        return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)

    @app.delete("/adapters/{version}", tags=["adapters"], **mutating)
    async def delete_adapter(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> dict[str, Any]:
        """Delete a version: registry tombstone (its number is never reused) and its S3 objects.
        409 when an alias points to it or a queued/running job trains on top of it."""
        return (await registry.delete_version(ctx.db, ctx.store, model_of(ctx, model), version)).as_dict()

    @app.post("/adapters/gc", tags=["adapters"], **mutating)
    async def collect_garbage(
        ctx: Ctx,
        keep: Annotated[int, Query(ge=0, le=100_000, description="Newest versions to keep besides aliases.")] = 10,
        dry_run: Annotated[bool, Query(description="Only report what would be deleted.")] = False,
        model: ModelParam = None,
    ) -> dict[str, Any]:
        """Delete all but the `keep` newest versions (never production, previous or a running job's parent)
        and sweep S3 folders no registry row claims (failed uploads)."""
        return (await registry.collect_garbage(ctx.db, ctx.store, model_of(ctx, model), keep, dry_run)).as_dict()

    @app.post("/users/forget", response_model=ForgetResponse, tags=["privacy"], **mutating)
    async def forget_user(ctx: Ctx, request: ForgetRequest) -> ForgetResponse:
        """Delete every stored sample of a user (all model lines); report the versions trained on them.

        Released adapters are not unlearned: `trained_on` lists the versions whose window held the samples,
        `later_versions` those that continue from them (and whose replay may have drawn them). The next
        versions no longer see the data. The user id travels in the body, not the path, to stay out of
        access logs; the engine logs the request by `request_id`, without the user id."""
        request_id = uuid.uuid4().hex[:16]
        result = await privacy.forget_user(ctx.db, request.user_id)
        metrics.FORGET_REQUESTS.inc()
        metrics.SAMPLES_FORGOTTEN.inc(result.deleted_samples)
        log.info(
            "forget request %s: %d samples deleted from windows %s; versions trained on them: %s;"
            " later versions: %s; running jobs: %s",
            request_id,
            result.deleted_samples,
            result.windows or "-",
            ", ".join(f"{a.model} {a.version}" for a in result.trained_on) or "-",
            ", ".join(f"{a.model} {a.version}" for a in result.later_versions) or "-",
            result.running_jobs or "-",
        )
        return ForgetResponse(request_id=request_id, **result.as_dict())

    @app.get("/metrics", tags=["metrics"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics(ctx: Ctx) -> Response:
        """Prometheus text format; gauges read from PostgreSQL and consumer lag are refreshed first."""
        await ctx.collect()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the admin API (docs/openapi.json is this, as JSON)."""
    return create_app().openapi()


def _key(ctx: EngineContext) -> str | None:
    key = ctx.settings.signing_key
    return key.get_secret_value() if key else None


async def _probe(ctx: EngineContext, probe: Awaitable[Any]) -> Check:
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(probe, HEALTH_TIMEOUT_S)
    except TimeoutError:
        detail = f"no answer within {HEALTH_TIMEOUT_S:.0f} s"
    except StreamEngineError as exc:
        detail = str(exc)
    except Exception as exc:
        detail = type(exc).__name__
    else:
        detail = "bucket is missing" if result is False else ""
    detail = redact(detail, settings_secrets(ctx.settings))
    return Check(ok=not detail, detail=detail, seconds=round(time.perf_counter() - started, 4))


async def _kafka_ping(ctx: EngineContext) -> None:
    client = ctx.producer.client
    nodes = [broker.nodeId for broker in client.cluster.brokers()]
    for node in nodes:
        if await client.ready(node):
            return
    raise ServiceUnavailable("Kafka", ctx.settings.kafka.bootstrap_servers, "no broker answers")


def _ingest_check(ctx: EngineContext) -> Check:
    app = ctx.app
    if app is None:
        return Check(ok=False, detail="not started", seconds=0.0)
    if app.crashed or app.should_stop:
        return Check(ok=False, detail=f"stopped: {type(app.crash_reason).__name__}", seconds=0.0)
    with contextlib.suppress(Exception):
        assigned = sorted(tp.partition for tp in app.consumer.assignment())
        return Check(ok=True, detail=f"partitions {assigned}", seconds=0.0)
    return Check(ok=True, detail="", seconds=0.0)


def bind_api_socket(settings: Settings) -> socket.socket:
    """Listen on api.host:api.port now, so a taken port is a clear ConfigError before anything starts."""
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
