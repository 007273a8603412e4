"""Request and response models of the admin HTTP API (they make its OpenAPI document, docs/openapi.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamengine.core.job_states import JobState


class ErrorBody(BaseModel):
    """Every error response: 401, 404, 409, 415, 422, 500, 503."""

    error: str = Field(description="Error class: Unauthorized, NotFound, Conflict, ValidationError, ...")
    message: str = Field(description="What went wrong, fit to show a user (never a secret).")
    details: list[dict[str, Any]] | None = Field(None, description="Validation errors: loc, msg, type.")


class Check(BaseModel):
    ok: bool
    detail: str = Field("", description="Why a dependency is not ready (no secrets).")
    seconds: float = Field(description="How long the probe took.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    checks: dict[str, Check] = Field(description="kafka, postgres, s3, ingest, engine.")


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=200, description="Model line (default: the only one; required when there are several)."
    )
    min_samples: int = Field(1, ge=1, description="Refuse (409) when the open window holds fewer samples.")


class TrainResponse(BaseModel):
    model: str
    job_id: int
    window_id: int
    reason: Literal["manual"] = "manual"
    samples: int
    weight: float


class RolloutInfo(BaseModel):
    """A canary trial of a version and how it ended (docs/serving.md, Canary judgement)."""

    id: int
    model: str
    version: str = Field(description="The version on trial.")
    production_version: str = Field(description="The production version it is compared with.")
    canary_nodes: list[str] = Field(description="The nodes that run it during the trial.")
    state: Literal["running", "promoted", "rolled_back", "aborted"]
    started_at: datetime
    decided_at: datetime | None
    decision: dict[str, Any] | None = Field(
        description="The decision with its numbers (action, rule, canary and production counts, prob_worse, "
        "failed_nodes, reason, by); while running, the latest judgement."
    )


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
    stage: Literal["canary", "production", "rolled_back"] = Field(
        description="How far the version got: on trial, released to production, or rolled back from its trial."
    )
    rollout: RolloutInfo | None = Field(None, description="Its canary trial, when it had one (one version's view).")


class ReleaseResponse(BaseModel):
    model: str
    version: str
    reason: str
    event_id: str


class JobProgress(BaseModel):
    """What the worker's heartbeats last stored (more keys may appear)."""

    model_config = ConfigDict(extra="allow")

    phase: str | None = Field(
        None,
        description="preparing, waiting_for_trainer (a trainer process starting, or the warm one finishing its "
        "checks), loading_base, setting_up (the base already loaded), evaluating, training, fisher, uploading, "
        "releasing.",
    )
    phase_started_at: datetime | None = Field(None, description="When the phase began (the worker's clock).")
    phase_elapsed_s: float | None = Field(None, description="Seconds in the phase so far (running jobs).")
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = Field(None, description="Loss of the last step (task loss plus EWC penalty).")
    recent_losses: list[float] | None = Field(None, description="Losses of the last steps (up to 32), oldest first.")
    tokens_per_s: float | None = None
    eta_s: float | None = Field(None, description="Seconds of training left, estimated.")


class FisherRequest(BaseModel):
    model: str | None = Field(None, description="Model line (default: the only one; required when there are several).")
    version: str = Field("production", description="A released version or alias.")


class FisherResponse(BaseModel):
    model: str
    version: str
    job_id: int


class JobInfo(BaseModel):
    id: int
    kind: Literal["train", "fisher"] = "train"
    target_version: str | None = Field(None, description="The version a Fisher job computes for.")
    model: str
    window_id: int
    reason: str
    state: JobState
    attempts: int
    version: str | None
    parent_version: str | None
    progress: JobProgress
    metrics: dict[str, Any]
    error: str | None = Field(description="Why the job failed or was rejected.")
    waiting: str | None = Field(None, description="Why a queued job waits (a canary on trial).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class OpenWindow(BaseModel):
    id: int
    samples: int = Field(description="Trainable samples.")
    weight: float
    stored: int = Field(description="All samples stored, trainable or not.")
    opened_at: datetime


class TrainingStatus(BaseModel):
    model: str
    production: str | None
    previous: str | None
    open_window: OpenWindow | None
    last_tick_at: datetime | None
    next_tick_at: datetime | None = Field(description="Next cron tick (window.schedule, window.timezone).")
    jobs_by_state: dict[str, int] = Field(description="Counts over all jobs of the model line.")
    jobs: list[JobInfo] = Field(description="Most recent jobs, newest first.")
    canary: str | None = Field(None, description="The version on trial, while a canary runs.")


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=256, description="The `user_id` of the user's feedback events.")


class VersionRef(BaseModel):
    model: str
    version: str
    deleted: bool = Field(description="Deleted from the registry and S3 since (a tombstone).")


class ForgetResponse(BaseModel):
    """What a forget request deleted. Released adapters are not unlearned: see docs/operations.md, Privacy."""

    request_id: str = Field(description="Also in the engine's log line of this request (which holds no user data).")
    deleted_samples: int = Field(description="The user's samples deleted, all model lines.")
    windows: list[int] = Field(description="Windows that held them.")
    trained_on: list[VersionRef] = Field(
        description="Versions trained on a window that held them (still hold what they learned from them)."
    )
    later_versions: list[VersionRef] = Field(
        description="Later versions of the same model lines: each continues from its parent's weights, and replay "
        "draws from earlier windows, so they may have seen the samples too."
    )
    running_jobs: list[int] = Field(
        description="Jobs running now that may have read the samples before they were deleted."
    )
