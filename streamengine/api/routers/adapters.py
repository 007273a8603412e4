"""Adapters: list and inspect versions; deploy, roll back, promote or abort a canary, delete and collect garbage
(mutating, token)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from streamengine.api.dependencies import ERRORS, MUTATING, Ctx, ModelParam, VersionParam, model_of, signer
from streamengine.api.models import AdapterInfo, ReleaseResponse, RolloutInfo
from streamengine.jobs.rollout import policy_of
from streamengine.store import registry, rollouts

router = APIRouter(tags=["adapters"])


@router.get("/adapters", response_model=list[AdapterInfo], responses=ERRORS)
async def list_adapters(ctx: Ctx, model: ModelParam = None) -> list[dict[str, Any]]:
    """Every version of the model line, newest first, with its aliases and metrics."""
    return [a.as_dict() for a in await registry.list_adapters(ctx.reads, model_of(ctx, model))]


@router.get("/adapters/{version}", response_model=AdapterInfo, responses=ERRORS)
async def adapter_info(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> dict[str, Any]:
    """One version, by name or alias, with its canary trial and the decision that ended it."""
    adapter = await registry.get_adapter(ctx.reads, model_of(ctx, model), version)
    trial = await rollouts.of_version(ctx.reads, adapter.model, adapter.version)
    return {**adapter.as_dict(), "rollout": trial.as_dict() if trial else None}


@router.post("/adapters/promote", response_model=RolloutInfo, **MUTATING)
async def promote(ctx: Ctx, model: ModelParam = None) -> dict[str, Any]:
    """Promote the canary on trial now: it becomes production and is announced on adapter.released; 409 when
    no canary runs."""
    name = model_of(ctx, model)
    policy, topic = policy_of(ctx.lines.for_line(name).rollout), ctx.settings.kafka.released_topic
    trial = await rollouts.decide_by_hand(ctx.db, name, "promote", policy, topic, signer(ctx))
    return trial.as_dict()


@router.post("/adapters/abort", response_model=RolloutInfo, **MUTATING)
async def abort(ctx: Ctx, model: ModelParam = None) -> dict[str, Any]:
    """Abort the canary on trial: its nodes go back to production, the version is rolled back; 409 when no
    canary runs."""
    name = model_of(ctx, model)
    policy, topic = policy_of(ctx.lines.for_line(name).rollout), ctx.settings.kafka.released_topic
    trial = await rollouts.decide_by_hand(ctx.db, name, "abort", policy, topic, signer(ctx))
    return trial.as_dict()


@router.post("/adapters/rollback", response_model=ReleaseResponse, **MUTATING)
async def rollback(ctx: Ctx, model: ModelParam = None) -> ReleaseResponse:
    """Make `previous` the production version again and announce it (reason `rollback`)."""
    topic = ctx.settings.kafka.released_topic
    event = await registry.rollback(ctx.db, model_of(ctx, model), topic, signer(ctx))
    return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)


@router.post("/adapters/{version}/deploy", response_model=ReleaseResponse, **MUTATING)
async def deploy(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> ReleaseResponse:
    """Make a version the production adapter and announce it on adapter.released (reason `manual`)."""
    name = model_of(ctx, model)
    event = await registry.deploy(ctx.db, name, version, ctx.settings.kafka.released_topic, signer(ctx))
    return ReleaseResponse(model=event.model, version=event.version, reason=event.reason, event_id=event.event_id)


@router.delete("/adapters/{version}", **MUTATING)
async def delete_adapter(ctx: Ctx, version: VersionParam, model: ModelParam = None) -> dict[str, Any]:
    """Delete a version: registry tombstone (its number is never reused) and its S3 objects.
    409 when an alias points to it or a queued/running job trains on top of it."""
    return (await registry.delete_version(ctx.db, ctx.store, model_of(ctx, model), version)).as_dict()


@router.post("/adapters/gc", **MUTATING)
async def collect_garbage(
    ctx: Ctx,
    keep: Annotated[int, Query(ge=0, le=100_000, description="Newest versions to keep besides aliases.")] = 10,
    dry_run: Annotated[bool, Query(description="Only report what would be deleted.")] = False,
    model: ModelParam = None,
) -> dict[str, Any]:
    """Delete all but the `keep` newest versions (never production, previous or a running job's parent)
    and sweep S3 folders no registry row claims (failed uploads)."""
    return (await registry.collect_garbage(ctx.db, ctx.store, model_of(ctx, model), keep, dry_run)).as_dict()
