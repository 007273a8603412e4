"""The training job's input (:class:`TrainSpec`) and output (:class:`TrainResult`, :class:`Progress`).

These models are the boundary between the worker and the training process: the worker writes a
``TrainSpec`` as JSON, runs ``python -m streamengine.training.recipe SPEC.json`` and reads one JSON
object per stdout line (``{"event": "progress", ...}``, then ``{"event": "result", ...}`` or
``{"event": "error", "message": ...}``).

Samples file (JSONL), one object per line::

    {"event_id": "e1", "prompt": "<JSON text: a string or [{role, content}, ...]>",
     "completion": "the answer to learn", "weight": 1.0}
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamengine.config import LoraSettings, TrainingSettings
from streamengine.errors import TrainingError


class TrainSpec(BaseModel):
    """One training job: which base, which parent adapter, which samples, where the adapter goes."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="Local Hugging Face model folder (or anything from_pretrained takes).")
    parent_adapter: str | None = Field(
        None, description="Local PEFT adapter folder to continue from; its LoRA config wins over `lora`."
    )
    samples_path: str = Field(description="JSONL file of samples (see the module docstring).")
    output_dir: str = Field(description="Where the adapter files and result.json are written.")
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    ewc_lambda: float = Field(0.0, ge=0, description="Recorded; the EWC penalty plugs into recipe.train.")
    model_name: str = ""
    version: str = ""

    @classmethod
    def read(cls, path: str | Path) -> TrainSpec:
        """Load a spec file, turning every problem into a :class:`TrainingError`."""
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TrainingError(f"cannot read training spec {path}: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise TrainingError(f"invalid training spec {path}: {problems}") from None


class Progress(BaseModel):
    """One optimizer step done (reported after every step)."""

    step: int
    total_steps: int
    epoch: int
    loss: float = Field(description="Weighted loss of this step's batch.")
    tokens_per_s: float
    eta_s: float


class TrainResult(BaseModel):
    """What a finished job reports; also written to ``output_dir/result.json``.

    The eval losses are the weighted per-sample mean token NLL over all training samples, measured
    in eval mode (no dropout) before the first and after the last step. ``train_loss`` is the same
    weighted mean over the last epoch's training batches (dropout on).
    """

    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    tokens: int = Field(description="Non-padding tokens fed through the model in training steps.")
    seconds: float = Field(description="Wall time of the whole job, loading and saving included.")
    samples: int = Field(description="Samples trained on (those with a positive weight).")


def event_line(event: str, body: BaseModel | dict[str, object]) -> str:
    """One stdout line of the training process: ``{"event": ..., **body}``."""
    fields = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return json.dumps({"event": event, **fields}, ensure_ascii=False)
