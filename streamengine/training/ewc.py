"""The EWC penalty: ``lambda / 2 * sum_j F_j * (theta_j - theta*_j)^2`` over the LoRA parameters.

``F`` and ``theta*`` come from the parent version's ``fisher.safetensors`` (see :mod:`fisher`), so the
penalty pulls the adapter towards the parent in the directions that mattered to every earlier window
(online EWC). The recipe adds it to each step's task loss and logs both separately.

The parameters are concatenated into one vector per call (one copy of the LoRA weights), so the
penalty costs a handful of kernels whatever the number of LoRA tensors; bench/fisher_ewc.py measures
its overhead against a plain LoRA step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamengine.errors import TrainingError
from streamengine.training.fisher import FisherState, check_names, load_fisher, lora_parameters


class EwcPenalty:
    """A callable penalty bound to the model's LoRA parameters (the recipe's ``Penalty`` seam)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], state: FisherState, lam: float) -> None:
        if lam < 0:
            raise TrainingError(f"EWC lambda must not be negative, got {lam}")
        check_names(set(state.importance), set(params), "the parent Fisher")
        self.params = list(params.values())
        self.lam = float(lam)
        device = self.params[0].device
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        for name in params:
            for kind, table in (("importance", state.importance), ("anchor", state.anchor)):
                if tuple(table[name].shape) != shapes[name]:
                    raise TrainingError(
                        f"the parent Fisher's {kind} of {name} has shape {tuple(table[name].shape)}, "
                        f"the adapter's is {shapes[name]}"
                    )
        self.importance = torch.cat([state.importance[n].reshape(-1).float() for n in params]).to(device)
        self.anchor = torch.cat([state.anchor[n].reshape(-1).float() for n in params]).to(device)
        if not torch.isfinite(self.importance).all() or (self.importance < 0).any():
            raise TrainingError("the parent Fisher holds negative or non-finite importances")

    @classmethod
    def from_file(cls, model: torch.nn.Module, path: str | Path, lam: float) -> EwcPenalty:
        return cls(lora_parameters(model), load_fisher(path), lam)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1).float() for p in self.params])

    def __call__(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The penalty as a differentiable scalar (``model`` is ignored: the parameters are bound)."""
        diff = self.flat() - self.anchor
        return 0.5 * self.lam * torch.dot(self.importance, diff * diff)

    @torch.no_grad()
    def gradient(self) -> torch.Tensor:
        """The penalty's gradient ``lambda * F * (theta - theta*)`` as one flat vector (for tests)."""
        return self.lam * self.importance * (self.flat() - self.anchor)
