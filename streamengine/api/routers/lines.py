"""Model lines: what this engine serves and the policy that closes their windows (threshold and tick), so a
reader can tell how full a window is (`streamengine top`, `streamengine models`)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from streamengine.api.dependencies import Ctx
from streamengine.store import windows

router = APIRouter(tags=["training"])


class WindowPolicy(BaseModel):
    max_samples: int = Field(description="Trainable samples that close a window (window.max_samples).")
    max_weight: float | None = Field(description="Summed weight that closes a window (window.max_weight), if set.")
    min_samples: int = Field(description="Fewest samples the tick trains on (window.min_samples).")
    schedule: str = Field(description="Cron expression of the tick (window.schedule).")
    timezone: str


class ModelLine(BaseModel):
    model: str
    base_model: str = Field(description="model.base, or the base of the line's models: entry")
    pattern: str | None = Field(None, description="The models: pattern the line matches (absent: named explicitly).")
    window: WindowPolicy


@router.get("/models", response_model=list[ModelLine], response_model_exclude_unset=True)
async def model_lines(ctx: Ctx) -> list[ModelLine]:
    """Every model line this engine serves, each with its effective window policy: the lines the settings name,
    then the lines matched by a pattern that have written a window, by name. (A line in the database that no name
    or pattern matches any more is not served and not listed.)"""
    lines = ctx.lines
    named = lines.names()
    stored = sorted(name for name in await windows.last_ticks(ctx.reads) if name not in named and lines.matches(name))
    result = []
    for name in [*named, *stored]:
        settings, found = lines.for_line(name), lines.entry(name)
        window = WindowPolicy(**settings.window.model_dump(include=set(WindowPolicy.model_fields)))
        pattern = {"pattern": found[1].pattern} if found and found[1].pattern else {}
        result.append(ModelLine(model=name, base_model=settings.model.base, window=window, **pattern))
    return result
