"""Training: close a window now (manual train), queue a Fisher job, and report windows, ticks and jobs."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from streamengine import metrics
from streamengine.api.dependencies import ERRORS, MUTATING, Ctx, ModelParam, model_of
from streamengine.api.models import (
    FisherRequest,
    FisherResponse,
    JobInfo,
    JobProgress,
    OpenWindow,
    TrainingStatus,
    TrainRequest,
    TrainResponse,
)
from streamengine.errors import Conflict
from streamengine.store import job_queue, registry, windows

log = logging.getLogger(__name__)

router = APIRouter(tags=["training"])


@router.post("/train", response_model=TrainResponse, status_code=202, **MUTATING)
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


@router.post("/fisher/calculate", response_model=FisherResponse, status_code=202, **MUTATING)
async def fisher_calculate(ctx: Ctx, request: FisherRequest | None = None) -> FisherResponse:
    """Queue a job computing the Fisher of a released version (online EWC) and storing it beside it."""
    request = request or FisherRequest()
    model = model_of(ctx, request.model)
    version = (await registry.get_adapter(ctx.db, model, request.version)).version
    job_id = await job_queue.enqueue_fisher(ctx.db, model, version)
    log.info("Fisher of %s %s requested -> job %d", model, version, job_id)
    return FisherResponse(model=model, version=version, job_id=job_id)


@router.get("/training/status", response_model=TrainingStatus, responses=ERRORS)
async def training_status(
    ctx: Ctx,
    model: ModelParam = None,
    limit: Annotated[int, Query(ge=1, le=500, description="How many recent jobs.")] = 20,
) -> TrainingStatus:
    """The open window, production version, next tick and recent jobs (running ones with their phase, how long
    they have been in it, and training progress)."""
    name = model_of(ctx, model)
    window = await windows.open_window(ctx.reads, name)
    last_tick = await windows.last_tick(ctx.reads, name)
    jobs = await job_queue.list_jobs(ctx.reads, name, limit)
    canary = await registry.alias(ctx.reads, name, "canary")
    waiting = f"waits for the canary {canary} on trial to be decided, then trains from production" if canary else None
    return TrainingStatus(
        model=name,
        production=await registry.alias(ctx.reads, name, "production"),
        previous=await registry.alias(ctx.reads, name, "previous"),
        open_window=OpenWindow(**dataclasses.asdict(window)) if window else None,
        last_tick_at=last_tick,
        next_tick_at=ctx.schedule.next_after(last_tick) if ctx.schedule and last_tick else None,
        jobs_by_state=await job_queue.count_by_state(ctx.reads, name),
        jobs=[
            JobInfo(
                **{k: getattr(j, k) for k in JobInfo.model_fields if k not in ("progress", "waiting")},
                progress=_progress(j),
                waiting=waiting if j.state == "queued" and j.kind == "train" else None,
            )
            for j in jobs
        ],
        canary=canary,
    )


def _progress(job: job_queue.Job) -> JobProgress:
    """The job's stored progress; a running job's with the seconds it has been in its phase."""
    progress = JobProgress(**(job.progress or {}))
    if job.state == "running" and progress.phase_started_at is not None:
        progress.phase_elapsed_s = max(0.0, (datetime.now(UTC) - progress.phase_started_at).total_seconds())
    return progress
