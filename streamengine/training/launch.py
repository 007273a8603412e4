"""The command lines of the worker's child processes (torch-free, so the worker's own process never imports torch).

A training job in one process: ``python -m streamengine.training.recipe SPEC``; in ``N`` processes, torchrun
(``python -m torch.distributed.run --standalone --nproc_per_node N -m streamengine.training.recipe SPEC``;
see :mod:`streamengine.training.dist` for what the processes do then). A Fisher job:
``python -m streamengine.training.fisher_job SPEC``. A self-anchor build:
``python -m streamengine.training.anchor_job SPEC``. SPEC is a :mod:`streamengine.training.spec` file. A warm
trainer, kept between training jobs (one process): ``python -m streamengine.training.warm BASES``
(:mod:`streamengine.training.warm`; it reads its jobs on stdin).
"""

from __future__ import annotations

import os
import sys

RECIPE_MODULE = "streamengine.training.recipe"
FISHER_MODULE = "streamengine.training.fisher_job"
WARM_MODULE = "streamengine.training.warm"
ANCHOR_MODULE = "streamengine.training.anchor_job"


def training_command(spec_path: str | os.PathLike[str], processes: int = 1, python: str | None = None) -> list[str]:
    """The argv that runs one training job in ``processes`` processes (stdout: the JSON lines of rank 0)."""
    python = python or sys.executable
    if processes <= 1:
        return [python, "-m", RECIPE_MODULE, str(spec_path)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(processes)]
    return [python, *launcher, "-m", RECIPE_MODULE, str(spec_path)]


def fisher_command(spec_path: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """The argv that runs one Fisher job (a :class:`~streamengine.training.spec.FisherSpec` file)."""
    return [python or sys.executable, "-m", FISHER_MODULE, str(spec_path)]


def anchor_command(spec_path: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """The argv that builds a self-anchor set (an :class:`~streamengine.training.spec.AnchorSpec` file)."""
    return [python or sys.executable, "-m", ANCHOR_MODULE, str(spec_path)]


def warm_command(bases: int = 1, python: str | None = None) -> list[str]:
    """The argv of a warm trainer that keeps ``bases`` base models loaded between jobs."""
    return [python or sys.executable, "-m", WARM_MODULE, str(bases)]
