"""Averaging the trained adapter with its parent (TrainSpec ``parent_average``; WiSE-FT, Wortsman et al. 2022).

After the last step every trainable LoRA parameter becomes ``(1 - a) * trained + a * parent``, the parent
being the adapter as loaded at step 0: a point on the straight line between the two versions, which keeps
part of what the parent knew at the cost of part of what this window taught. Every process of a
distributed run holds the same parameters and applies the same average.
"""

from __future__ import annotations

import torch


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached copy of ``params`` (the parent's LoRA values before the first step)."""
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def average_with_parent(params: dict[str, torch.nn.Parameter], parent: dict[str, torch.Tensor], share: float) -> None:
    """In place: each parameter ``p`` becomes ``(1 - share) * p + share * parent[name]``."""
    for name, p in params.items():
        p.lerp_(parent[name].to(p.dtype), share)
