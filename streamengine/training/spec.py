"""The training job's input (:class:`TrainSpec`) and output (:class:`TrainResult`, :class:`Progress`).

These models are the boundary between the worker and the training process: the worker writes a
``TrainSpec`` as JSON, runs ``python -m streamengine.training.recipe SPEC.json`` and reads one JSON
object per stdout line (``{"event": "progress", ...}``, then ``{"event": "result", ...}`` or
``{"event": "error", "message": ...}``).

Samples file (JSONL), one object per line (``label`` and ``source`` are optional)::

    {"event_id": "e1", "prompt": "<JSON text: a string or [{role, content}, ...]>",
     "completion": "the answer", "weight": 1.0,
     "label": 1,             # +1 desirable (default), -1 undesirable (used by the KTO objective only)
     "source": "window"}     # window (default) | replay | anchor; the Fisher uses window lines only

Eval sets (``eval_sets``) use the same format; their desirable lines are scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamengine.config.settings import EwcSettings, LoraSettings, TrainingSettings
from streamengine.errors import TrainingError

Objective = Literal["sft", "kto"]
Quantization = Literal["none", "8bit", "4bit"]


class TrainSpec(BaseModel):
    """One training job: which base, which parent adapter, which samples, where the adapter goes."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="Local Hugging Face model folder, hub id, or a .gguf file.")
    parent_adapter: str | None = Field(
        None, description="Local PEFT adapter folder to continue from; its LoRA config wins over `lora`."
    )
    samples_path: str = Field(description="JSONL file of samples (see the module docstring).")
    output_dir: str = Field(description="Where the adapter files and result.json are written.")
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    ewc: EwcSettings = EwcSettings()
    ewc_lambda: float | None = Field(
        None, ge=0, description="Older spelling of ewc.lambda: sets it when `ewc` is not given, must agree if it is."
    )
    parent_fisher: str | None = Field(
        None, description="The parent version's fisher.safetensors: the EWC penalty's F and theta*; none, no penalty."
    )
    eval_sets: dict[str, str] = Field(
        {}, description="Name -> JSONL path (samples format); each is scored before and after training."
    )
    objective: Objective | None = Field(None, description="sft or kto; None takes training.objective.")
    quantization: Quantization = Field("none", description="Load the base in 8 or 4 bits (bitsandbytes).")
    compute_fisher: bool = Field(True, description="Write fisher.safetensors (online EWC) beside the adapter.")
    model_name: str = ""
    version: str = ""

    @model_validator(mode="after")
    def _one_lambda(self) -> TrainSpec:
        if self.ewc_lambda is not None:
            if "ewc" not in self.model_fields_set:
                self.ewc = self.ewc.model_copy(update={"lambda_": self.ewc_lambda})
            elif self.ewc.lambda_ != self.ewc_lambda:
                raise ValueError(f"ewc_lambda {self.ewc_lambda} contradicts ewc.lambda {self.ewc.lambda_}")
        return self

    @property
    def effective_objective(self) -> Objective:
        """``objective`` when set, else ``training.objective``."""
        return self.objective or self.training.objective

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
    loss: float = Field(description="This step's objective: task_loss + penalty.")
    task_loss: float = Field(description="Weighted SFT (or KTO) loss of this step's batch.")
    penalty: float = Field(description="EWC penalty lambda/2 * sum F (theta - theta*)^2 (0 without a parent Fisher).")
    tokens_per_s: float
    eta_s: float


class TrainResult(BaseModel):
    """What a finished job reports; also written to ``output_dir/result.json``.

    The eval losses are the weighted per-sample mean token NLL over all desirable training samples,
    measured in eval mode (no dropout) before the first and after the last step. ``train_loss`` is the
    weighted mean task loss (SFT NLL, or the KTO loss) over the last epoch's training batches (dropout
    on). ``eval`` holds the same NLL for every eval set: ``before`` at the parent adapter (or the base),
    ``after`` at the trained adapter; ``samples`` is how many desirable samples were scored. A set
    with no desirable sample of positive weight is left out.
    """

    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    tokens: int = Field(description="Non-padding tokens fed through the model in training steps.")
    seconds: float = Field(description="Wall time of the whole job, loading and saving included.")
    samples: int = Field(description="Samples trained on (those with a positive weight).")
    eval: dict[str, dict[str, float]] = Field({}, description="{set: {before, after, samples}}.")
    fisher_seconds: float = Field(0.0, description="Wall time of the Fisher computation (0 when not computed).")
    ewc_penalty: float = Field(0.0, description="The last step's EWC penalty (0 without a parent Fisher).")
    objective: Objective = "sft"
    processes: int = Field(1, description="Training processes (DDP world size).")


def event_line(event: str, body: BaseModel | dict[str, object]) -> str:
    """One stdout line of the training process: ``{"event": ..., **body}``."""
    fields = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return json.dumps({"event": event, **fields}, ensure_ascii=False)
