"""The fleet: what each serving node of each model line last reported on ``adapter.status`` (stored by the
engine's status consumer, :mod:`streamengine.stream.fleet`), with nodes silent for longer than
``rollout.node_timeout_s`` flagged."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from streamengine.api.dependencies import ERRORS, Ctx
from streamengine.store import fleet

router = APIRouter(tags=["fleet"])


class FleetNode(BaseModel):
    node_id: str
    version: str | None = Field(description="What it serves (None: the base model, no adapter yet).")
    stage: Literal["production", "canary"] = Field(description="Whether it follows production or runs a canary.")
    state: Literal["downloading", "serving", "failed"]
    canary: bool = Field(description="Takes part in canaries (serving.canary); canaries are picked among these.")
    target_version: str | None = Field(description="The version it is downloading or failed to load.")
    reason: str | None = Field(description="Why its last load failed (state failed), or why it is retrying.")
    swapped_at: datetime | None = Field(description="When it began serving ``version``.")
    heartbeat_at: datetime = Field(description="Time of its last status record.")
    silent: bool = Field(description="No status for longer than rollout.node_timeout_s (not counted below).")


class VersionCount(BaseModel):
    version: str | None
    stage: Literal["production", "canary"]
    nodes: int = Field(description="Nodes (not silent) serving this version in this stage.")


class FleetLine(BaseModel):
    model: str
    live: int = Field(description="Nodes heard from within rollout.node_timeout_s.")
    failed: int = Field(description="Live nodes whose last load failed.")
    silent: int = Field(description="Nodes silent for longer than rollout.node_timeout_s.")
    versions: list[VersionCount] = Field(description="Live nodes per version and stage, most nodes first.")
    nodes: list[FleetNode] = Field(description="Every node that reported, by node id.")


class Fleet(BaseModel):
    node_timeout_s: float = Field(description="rollout.node_timeout_s: older status makes a node silent.")
    lines: list[FleetLine] = Field(description="One entry per model line with reporting nodes, by name.")


ModelFilter = Annotated[str | None, Query(max_length=200, description="Only this model line (default: every line).")]


@router.get("/fleet", response_model=Fleet, responses={422: ERRORS[422]})
async def fleet_view(ctx: Ctx, model: ModelFilter = None) -> Fleet:
    """Serving nodes per model line as they last reported: version, stage, state, silent flag; counts per
    version and stage."""
    timeout_s = ctx.settings.rollout.node_timeout_s
    by_line: dict[str, list[fleet.FleetNode]] = {}
    for node in await fleet.nodes(ctx.reads, timeout_s, model):
        by_line.setdefault(node.model, []).append(node)
    return Fleet(node_timeout_s=timeout_s, lines=[_line(name, nodes) for name, nodes in by_line.items()])


def _line(model: str, nodes: list[fleet.FleetNode]) -> FleetLine:
    live = [n for n in nodes if not n.silent]
    counts = Counter((n.version, n.stage) for n in live)
    return FleetLine(
        model=model,
        live=len(live),
        failed=sum(n.state == "failed" for n in live),
        silent=len(nodes) - len(live),
        versions=[
            VersionCount(version=version, stage=stage, nodes=count)
            for (version, stage), count in sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
        ],
        nodes=[FleetNode(**{name: getattr(n, name) for name in FleetNode.model_fields}) for n in nodes],
    )
