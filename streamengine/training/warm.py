"""``python -m streamengine.training.warm BASES``: a trainer process that stays up between jobs (a worker's warm
trainer, :mod:`streamengine.jobs.warm_trainer`).

It imports torch, transformers and peft once and keeps the last ``BASES`` base models loaded
(:class:`~streamengine.training.model.BaseCache`). Each job is the recipe's :func:`~streamengine.training.recipe.train`
on a kept base: the job's LoRA (fresh, or the parent's weights) goes onto it, is trained and saved, and is
taken off again, leaving the base exactly as loaded. A warm job prints the lines a one-job trainer prints
(``phase``, ``progress``, ``result`` or ``error``), so its phases read alike, except that a base it holds
already is not loaded again (phase ``setting_up`` instead of ``loading_base``). The pipe is
:mod:`~streamengine.training.warm_protocol`.

Isolation stays that of a one-job process: a job that fails in any way ends the process after its
``error`` line, so nothing a failure leaves behind (a LoRA still on the base, memory the allocator keeps,
a broken CUDA context) reaches the next job; a crash, an out-of-memory kill or a hang ends it as it ends a
one-job trainer. The worker starts it through :mod:`~streamengine.training.child` (the filtered environment,
death with the worker, the memory cap) and restarts it after ``worker.max_jobs_per_process`` jobs or when
its memory grows past ``worker.warm_max_rss_mb``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TextIO

import torch
from pydantic import BaseModel
from transformers.utils import logging as hf_logging

from streamengine.errors import TrainingError
from streamengine.training.launch import WARM_MODULE
from streamengine.training.model import BaseCache, release_memory, select_device
from streamengine.training.recipe import train
from streamengine.training.spec import event_line
from streamengine.training.warm_protocol import REQUESTS, Preload, Ready, TrainJob

Emit = Callable[[str, BaseModel | dict[str, object]], None]


class WarmTrainer:
    """The process's state: its kept bases and the jobs it ran."""

    def __init__(self, bases: int, emit: Emit) -> None:
        self.bases = BaseCache(bases)
        self.emit = emit
        self.jobs = 0

    def ready(self) -> None:
        self.emit("ready", self.status())

    def status(self) -> Ready:
        accelerator = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
        return Ready(
            pid=os.getpid(),
            jobs=self.jobs,
            rss_bytes=resident_bytes(),
            accelerator_bytes=accelerator,
            bases=self.bases.names(),
            base_loads=self.bases.loads,
            last_base_load_s=self.bases.last_load_s,
        )

    def preload(self, request: Preload) -> None:
        """Load a base between jobs; a base that cannot load is reported (the job that needs it fails on it)."""
        try:
            self.bases.get(request.base_model, select_device(request.device), request.quantization)
        except TrainingError as exc:
            self.emit("error", {"message": str(exc)})

    def run(self, job: TrainJob) -> bool:
        """Run one job (its stderr into its log); False when it failed and the process must end."""
        spec, self.jobs = job.spec, self.jobs + 1
        held = False

        def phase(name: str) -> None:
            self.emit("phase", {"phase": "setting_up" if name == "loading_base" and held else name})

        with stderr_to(job.log_path):
            try:
                device = select_device(spec.training.device)
                held = self.bases.holds(BaseCache.key(spec.base_model, device, spec.quantization))
                result = train(spec, progress=lambda p: self.emit("progress", p), phase=phase, bases=self.bases)
            except TrainingError as exc:
                self.emit("error", {"message": str(exc)})
                return False
            except Exception as exc:  # a crash: one structured line for the worker, the traceback in the log
                traceback.print_exc()
                self.emit("error", {"message": f"{type(exc).__name__}: {exc}"})
                return False
        self.emit("result", result)
        try:
            self.bases.restore()
        except TrainingError as exc:
            print(f"warm trainer ends: {exc}", file=sys.stderr, flush=True)
            return False
        release_memory(device)
        return True


@contextlib.contextmanager
def stderr_to(path: str) -> Iterator[None]:
    """File descriptor 2 (Python's and the C libraries' stderr) appended to ``path`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(target)
        os.close(saved)


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def serve(bases: int, requests: TextIO, out: TextIO) -> int:
    """Answer requests until stdin closes or a job fails."""

    def emit(event: str, body: BaseModel | dict[str, object]) -> None:
        out.write(event_line(event, body) + "\n")
        out.flush()

    trainer = WarmTrainer(bases, emit)
    trainer.ready()
    while line := requests.readline():
        if not line.strip():
            continue
        request = REQUESTS.validate_json(line)
        if isinstance(request, Preload):
            trainer.preload(request)
        elif not trainer.run(request):
            return 0
        trainer.ready()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print(event_line("error", {"message": f"usage: python -m {WARM_MODULE} BASES"}), flush=True)
        return 2
    hf_logging.disable_progress_bar()
    out, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints cannot break the JSON lines
    return serve(int(args[0]), sys.stdin, out)


if __name__ == "__main__":
    sys.exit(main())
