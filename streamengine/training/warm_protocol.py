"""The warm trainer's pipe (torch-free: the worker imports it), one JSON object a line each way.

In (stdin): a :class:`Preload` (load a base model and keep it) or a :class:`TrainJob` (a
:class:`~streamengine.training.spec.TrainSpec` and the file the job's log goes to). Out (stdout): a
:class:`Ready` line once the process has started and after each request; while a job runs, ``phase``
and ``progress`` lines and then its ``result`` or ``error`` line, exactly as a one-job trainer prints
them (:mod:`streamengine.training.spec`). After a failed job the process prints its ``error`` line and
exits instead of a :class:`Ready` line. Closing stdin ends the process.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from streamengine.training.spec import Quantization, TrainSpec


class Preload(BaseModel):
    """Load ``base_model`` now (between jobs), so that the next job on it finds it loaded."""

    request: Literal["preload"] = "preload"
    base_model: str
    device: str = "auto"
    quantization: Quantization = "none"


class TrainJob(BaseModel):
    """Run one training job; its stderr (the libraries' output, a traceback) is appended to ``log_path``."""

    request: Literal["train"] = "train"
    spec: TrainSpec
    log_path: str


Request = Annotated[Preload | TrainJob, Field(discriminator="request")]
REQUESTS: TypeAdapter[Preload | TrainJob] = TypeAdapter(Request)


class Ready(BaseModel):
    """The process waits for its next request (``{"event": "ready", ...}``)."""

    pid: int
    jobs: int = Field(description="Training jobs this process has run.")
    rss_bytes: int = Field(description="Resident memory of the process (CPU).")
    accelerator_bytes: int = Field(0, description="GPU memory torch's allocator holds (0 on CPU).")
    bases: list[str] = Field(description="Base models kept loaded, used longest ago first.")
    base_loads: int = Field(0, description="Base models loaded since the process started.")
    last_base_load_s: float = Field(0.0, description="Seconds the last base load took.")
