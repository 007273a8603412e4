"""The child processes' input and output: :class:`TrainSpec` -> :class:`Progress`, :class:`TrainResult`;
:class:`FisherSpec` -> :class:`FisherResult`; :class:`AnchorSpec` -> :class:`AnchorResult`.

These models are the boundary between the worker and the processes it runs (torch-free, so the worker
imports them): the worker writes a spec as JSON, runs the command line of :mod:`launch` and reads one
JSON object per stdout line (``{"event": "progress", ...}``, then ``{"event": "result", ...}`` or
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
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamengine.config.settings import (
    DistillSettings,
    EwcSettings,
    LoraSettings,
    SelfAnchorSettings,
    TrainingSettings,
)
from streamengine.errors import TrainingError

SpecT = TypeVar("SpecT", bound="_SpecFile")
Objective = Literal["sft", "kto"]
Quantization = Literal["none", "8bit", "4bit"]


class _SpecFile(BaseModel):
    """A job description the worker writes as a JSON file and the child process reads."""

    model_config = ConfigDict(extra="forbid")

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(by_alias=True), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """Load a spec file, turning every problem into a :class:`TrainingError`."""
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TrainingError(f"cannot read job spec {path}: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise TrainingError(f"invalid job spec {path}: {problems}") from None


class TrainSpec(_SpecFile):
    """One training job: which base, which parent adapter, which samples, where the adapter goes."""

    base_model: str = Field(description="Local Hugging Face model folder, hub id, or a .gguf file.")
    parent_adapter: str | None = Field(
        None, description="Local PEFT adapter folder to continue from; its LoRA config wins over `lora`."
    )
    samples_path: str = Field(description="JSONL file of samples (see the module docstring).")
    output_dir: str = Field(description="Where the adapter files and result.json are written.")
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    ewc: EwcSettings = EwcSettings()
    parent_fisher: str | None = Field(
        None, description="The parent version's fisher.safetensors: the EWC penalty's F and theta*; none, no penalty."
    )
    distill: DistillSettings = DistillSettings()
    eval_sets: dict[str, str] = Field(
        {}, description="Name -> JSONL path (samples format); each is scored before and after training."
    )
    base_sets: list[str] = Field(
        [], description="Eval sets also scored at the base model (adapter off): eval[set]['base'] (the anchor set)."
    )
    quantization: Quantization = Field("none", description="Load the base in 8 or 4 bits (bitsandbytes).")
    compute_fisher: bool = Field(True, description="Write fisher.safetensors (online EWC) beside the adapter.")
    parent_average: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Average with the parent (WiSE-FT): after the last step every LoRA parameter becomes "
        "(1 - a) * trained + a * parent (the parent adapter as loaded), before the after-evaluation, the saved "
        "adapter and the Fisher. 0: off. Does nothing without a parent adapter.",
    )
    orthogonal_weight: float = Field(
        0.0,
        ge=0,
        description="O-LoRA-style penalty added to each step's loss: weight * sum over LoRA layers of "
        "||A0 (A - A0)^T||_F^2, A0 the parent's LoRA A (r x d); keeps the update of A orthogonal to the "
        "parent's row space. 0: off. Does nothing without a parent adapter.",
    )
    replay_keep: int | None = Field(
        None,
        ge=0,
        description="Replay chosen by loss: of the desirable `replay` lines, keep the replay_keep with the "
        "highest loss (mean completion NLL at the model as loaded, the parent adapter or the base, eval mode; "
        "ties: the earlier line) and drop the others before training. None, or no more candidates than "
        "replay_keep: every line stays, none is scored.",
    )
    anchor_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Anchor rotation: each epoch trains on every other line and on this many of the `anchor` "
        "lines, a fresh seeded draw per epoch, so the job sees many anchors at the step count of a few. None, "
        "or no more anchor lines than this: every line every epoch.",
    )


class Progress(BaseModel):
    """One optimizer step done (reported after every step)."""

    step: int
    total_steps: int
    epoch: int
    loss: float = Field(description="This step's objective: task_loss + penalty.")
    task_loss: float = Field(description="Weighted SFT (or KTO) loss of this step's batch.")
    penalty: float = Field(
        description="The penalties: EWC lambda/2 * sum F (theta - theta*)^2 (0 without a parent Fisher) "
        "plus the orthogonality penalty (orthogonal_weight)."
    )
    tokens_per_s: float
    eta_s: float


class TrainResult(BaseModel):
    """What a finished job reports; also written to ``output_dir/result.json``.

    The eval losses are the weighted per-sample mean token NLL over all desirable training samples,
    measured in eval mode (no dropout) before the first and after the last step. ``train_loss`` is the
    weighted mean task loss (SFT NLL, or the KTO loss) over the last epoch's training batches (dropout
    on). ``eval`` holds the same NLL for every eval set: ``before`` at the parent adapter (or the base),
    ``after`` at the trained adapter, ``base`` at the base model for the spec's ``base_sets``; ``samples``
    is how many desirable samples were scored. A set with no desirable sample of positive weight is left out.
    """

    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    tokens: int = Field(description="Non-padding tokens fed through the model in training steps.")
    seconds: float = Field(description="Wall time of the whole job, loading and saving included.")
    samples: int = Field(description="Samples trained on (those with a positive weight).")
    eval: dict[str, dict[str, float]] = Field({}, description="{set: {before, after, samples[, base]}}.")
    fisher_seconds: float = Field(0.0, description="Wall time of the Fisher computation (0 when not computed).")
    ewc_penalty: float = Field(
        0.0, description="The last step's penalty: EWC (0 without a parent Fisher) plus orthogonality (if set)."
    )
    replay_candidates: int = Field(0, description="Desirable `replay` lines in the samples file.")
    replay_kept: int = Field(0, description="Of those, the ones trained on (all unless replay_keep drops some).")
    replay_pick_seconds: float = Field(0.0, description="Wall time of scoring the replay candidates (replay_keep).")
    objective: Objective = "sft"
    processes: int = Field(1, description="Training processes (DDP world size).")


class FisherSpec(_SpecFile):
    """One Fisher job: the exact Fisher of a trained adapter on its window's samples (``streamengine fisher``)."""

    base_model: str
    adapter_dir: str = Field(description="The adapter's PEFT folder.")
    samples_path: str = Field(description="Its window's samples (only desirable `window` lines count).")
    out_path: str = Field(description="Where the Fisher file is written.")
    parent_fisher: str | None = Field(None, description="The parent version's Fisher file, accumulated onto.")
    ewc: EwcSettings = EwcSettings()
    training: TrainingSettings = TrainingSettings()
    quantization: Quantization = "none"


class FisherResult(BaseModel):
    """What a finished Fisher job reports."""

    path: str
    seconds: float


class AnchorSpec(_SpecFile):
    """One self-anchor build: prompts answered by the base model (:mod:`streamengine.training.self_anchor`)."""

    base_model: str
    out_path: str = Field(description="Where the anchor set (JSONL of prompt, completion) is written.")
    prompts_path: str | None = Field(None, description="The user's prompt-only file.")
    stream_path: str | None = Field(None, description="Prompts drawn from the stream (the same format).")
    self_anchor: SelfAnchorSettings = SelfAnchorSettings()
    device: str = "auto"
    quantization: Quantization = "none"


class AnchorResult(BaseModel):
    """What a finished self-anchor build reports."""

    path: str
    samples: int = Field(description="Pairs kept.")
    sources: dict[str, int] = Field(description="Pairs kept per source: prompts, stream, magpie.")
    dropped: dict[str, int] = Field(description="Pairs dropped per filter: unfinished, empty, duplicate, repeat.")
    seconds: float


def event_line(event: str, body: BaseModel | dict[str, object]) -> str:
    """One stdout line of a child process: ``{"event": ..., **body}``."""
    fields = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return json.dumps({"event": event, **fields}, ensure_ascii=False)


def child_main(argv: list[str], module: str, spec_type: type[SpecT], run: Callable[[SpecT], BaseModel]) -> int:
    """A one-shot child process (Fisher, self anchors): read the spec, run, print one ``result`` or ``error`` line.

    Exits 0, or 2 on a :class:`TrainingError` or a bad input (the message in the line).
    """
    if len(argv) != 1:
        print(event_line("error", {"message": f"usage: python -m {module} SPEC.json"}), flush=True)
        return 2
    try:
        result = run(spec_type.read(argv[0]))
    except (TrainingError, OSError, ValueError) as exc:
        print(event_line("error", {"message": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(event_line("result", result), flush=True)
    return 0
