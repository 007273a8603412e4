"""The training loss and its evaluation, shared by the recipe, the Fisher, KTO and the benchmarks.

A sample's loss is its mean token NLL over its completion tokens (prompt and padding masked). A batch's
loss is the weighted mean of its samples' losses, ``sum(w_i * loss_i) / sum(w_i)``. :func:`evaluate`
measures the same weighted mean over a whole set in eval mode (no dropout), optionally summed over
the processes of a distributed run (each process scoring its own shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from streamengine.training.data import IGNORE_INDEX, Batch, Encoded, collate

T = TypeVar("T")

# Sums a tensor over the processes of a distributed run, in place (the identity in one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position ``[B, T]`` (0 where masked) and the mask of counted positions.

    The labels are shifted, not the logits, so the ``[B*T, V]`` view needs no copy of the logits; the
    vocabulary stays the last, contiguous dimension (a ``[B, V, T]`` transpose is 20% slower on a GPU).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    return nll, (targets != IGNORE_INDEX).float()


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token NLL ``[B]`` of next-token predictions over the unmasked labels."""
    nll, counted = token_nll(logits, labels)
    return (nll * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1.0)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample summed log-probability ``[B]`` of the completion tokens (TRL's ``get_batch_logps``)."""
    nll, counted = token_nll(logits, labels)
    return -(nll * counted).sum(dim=1)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w_i * loss_i) / sum(w_i)``: a zero-weight sample changes neither the value nor the gradient."""
    weights = weights.to(losses.device, losses.dtype)
    return (losses * weights).sum() / weights.sum()


def forward_logits(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    logits: torch.Tensor = out.logits
    return logits


def batch_losses(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    return sample_losses(forward_logits(model, batch, device), batch["labels"].to(device))


def batches(items: Sequence[T], order: list[int], size: int) -> Iterator[list[T]]:
    """``items`` in ``order``, ``size`` at a time (the last batch may be shorter)."""
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start : start + size]]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    encoded: list[Encoded],
    size: int,
    pad: int,
    device: torch.device,
    reduce: Reduce | None = None,
) -> float:
    """Weighted mean of the per-sample losses over all of ``encoded``, in eval mode.

    With ``reduce``, ``encoded`` is this process's shard and the sums are added over all processes.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for chunk in batches(encoded, list(range(len(encoded))), size):
        batch = collate(chunk, pad)
        losses = batch_losses(model, batch, device)
        sums[0] += float((losses * batch["weights"].to(device)).sum())
        sums[1] += float(batch["weights"].sum())
    model.train(was_training)
    if reduce is not None:
        sums = reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
