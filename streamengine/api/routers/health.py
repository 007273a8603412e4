"""Health: liveness and readiness (each dependency probed within a timeout); open to anyone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from streamengine.api.context import EngineContext
from streamengine.api.dependencies import Ctx
from streamengine.api.models import Check, Health, Liveness
from streamengine.core.masking import redact, settings_secrets
from streamengine.errors import ServiceUnavailable, StreamEngineError

HEALTH_TIMEOUT_S = 3.0
"""Each dependency probe of GET /health gives up after this long (a dead dependency answers 503 fast)."""

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Liveness)
async def live() -> Liveness:
    """Liveness: the process answers (use for a livenessProbe; it does not look at dependencies)."""
    return Liveness()


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(ctx: Ctx) -> JSONResponse:
    """Readiness: Kafka, PostgreSQL and S3 probed concurrently (each within 3 s), ingest and background loops."""
    names = ("kafka", "postgres", "s3")
    probes = await asyncio.gather(
        _probe(ctx, _kafka_ping(ctx)), _probe(ctx, ctx.reads.ping()), _probe(ctx, ctx.store.aping())
    )
    checks = dict(zip(names, probes, strict=True))
    checks["ingest"] = _ingest_check(ctx)
    dead = [name for name, task in ctx.tasks.items() if task.done()]
    checks["engine"] = Check(ok=not dead, detail=", ".join(f"{n} stopped" for n in dead), seconds=0.0)
    ok = all(c.ok for c in checks.values())
    body = Health(status="ok" if ok else "degraded", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


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
        assigned = sorted(tp.partition for tp in app.assignment())
        return Check(ok=True, detail=f"partitions {assigned}", seconds=0.0)
    return Check(ok=True, detail="", seconds=0.0)
