"""Model lines: what this engine serves and the policy that closes their windows (threshold and tick), so a
reader can tell how full a window is (`streamengine top`)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from streamengine.api.dependencies import Ctx

router = APIRouter(tags=["training"])


class WindowPolicy(BaseModel):
    max_samples: int = Field(description="Trainable samples that close a window (window.max_samples).")
    max_weight: float | None = Field(description="Summed weight that closes a window (window.max_weight), if set.")
    min_samples: int = Field(description="Fewest samples the tick trains on (window.min_samples).")
    schedule: str = Field(description="Cron expression of the tick (window.schedule).")
    timezone: str


class ModelLine(BaseModel):
    model: str
    base_model: str = Field(description="model.base")
    window: WindowPolicy


@router.get("/models", response_model=list[ModelLine])
async def model_lines(ctx: Ctx) -> list[ModelLine]:
    """The model lines this engine serves, each with its window policy."""
    settings = ctx.settings
    window = WindowPolicy(**settings.window.model_dump(include=set(WindowPolicy.model_fields)))
    return [ModelLine(model=settings.model.name, base_model=settings.model.base, window=window)]
