"""One training job in one process or several (DDP through accelerate).

The worker starts it with :func:`streamengine.training.launch.training_command`. Under torchrun the recipe builds an
``accelerate.Accelerator``, which joins the process group (NCCL on GPUs, one GPU per process; gloo
on CPU) and wraps the model in DistributedDataParallel. One process runs without accelerate.

Data parallel semantics are those of the one-process run: ``training.batch_size`` is the global
batch, every process draws the same shuffled order and takes every ``world``-th sample of each
batch, scales its share of the weighted loss so that DDP's gradient average equals the one-process
gradient, and sums the logged numbers over processes. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from streamengine.training.child import die_with_parent
from streamengine.training.model import select_device


def launched_world_size() -> int:
    """The number of processes of this run, as torchrun (or ``accelerate launch``) set it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """The processes of one job; ``accelerator`` is None in a one-process run."""

    device: torch.device
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @classmethod
    def start(cls, device_name: str) -> Dist:
        if launched_world_size() <= 1:
            return cls(select_device(device_name))
        die_with_parent(os.getppid())  # torchrun dies with the worker; each rank with torchrun
        from accelerate import Accelerator

        cpu = device_name == "cpu" or not torch.cuda.is_available()
        if cpu and torch.get_num_threads() > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // launched_world_size()))
        accelerator = Accelerator(cpu=cpu)
        return cls(accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's share: every ``world``-th item from position ``rank``."""
        return items[self.rank :: self.world]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (the identity in one process)."""
        if self.world > 1:
            moved = tensor.to(self.device)
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def reduce(self) -> Any:
        """:meth:`sum` as the ``reduce`` argument of the loss and Fisher helpers (None in one process)."""
        return self.sum if self.world > 1 else None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        if self.accelerator is None:
            return model, optimizer
        prepared: tuple[Any, Any] = self.accelerator.prepare(model, optimizer)
        return prepared

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
