"""O-LoRA-style orthogonality between an adapter's versions (TrainSpec ``orthogonal_weight``).

O-LoRA (Wang et al. 2023, "Orthogonal subspace learning for language model continual learning") trains
each task's LoRA so that its A matrix stays orthogonal to the earlier tasks' (``||A_old A_new^T||^2``
added to the loss). Here one adapter is continued from version to version, so the new task's part of A is
this job's update ``A - A0``, ``A0`` the parent's value (``r x d``)::

    penalty = weight * sum over LoRA layers ||A0 (A - A0)^T||_F^2

It keeps the update of A out of the row space of the parent's A (what the parent reads from the input);
B is left free. It is 0, with a zero gradient, at step 0. The A matrices are stacked by shape (one stack
for a Llama's q/k/v/o), so a step costs a handful of kernels whatever the number of layers.
"""

from __future__ import annotations

import torch

from streamengine.errors import TrainingError


class OrthogonalPenalty:
    """A callable penalty bound to the model's LoRA A matrices (the recipe's ``Penalty`` seam)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], parent: dict[str, torch.Tensor], weight: float) -> None:
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, p in params.items():
            if name.endswith("lora_A.weight"):
                by_shape.setdefault(tuple(p.shape), []).append(name)
        if not by_shape:
            raise TrainingError("orthogonal_weight is set, but the adapter has no LoRA A matrix")
        self.weight = float(weight)
        self.groups = [
            ([params[n] for n in names], torch.stack([parent[n].float() for n in names])) for names in by_shape.values()
        ]

    def overlap(self) -> torch.Tensor:
        """``sum ||A0 (A - A0)^T||_F^2`` over the LoRA layers, differentiable."""
        total = torch.zeros((), device=self.groups[0][1].device)
        for params, anchor in self.groups:
            delta = torch.stack([p.float() for p in params]) - anchor
            total = total + torch.bmm(anchor, delta.transpose(1, 2)).square().sum()
        return total

    def __call__(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The penalty as a differentiable scalar (``model`` is ignored: the parameters are bound)."""
        return self.weight * self.overlap()
