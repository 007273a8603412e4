"""Metrics: the Prometheus scrape (open, so Prometheus needs no token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streamengine.api.dependencies import Ctx

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(ctx: Ctx) -> Response:
    """Prometheus text format; gauges read from PostgreSQL and consumer lag are refreshed first."""
    await ctx.collect()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
