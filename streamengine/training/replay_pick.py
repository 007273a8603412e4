"""Replay chosen by loss (TrainSpec ``replay_keep``): of the samples file's replay lines, train on the ones
the parent knows worst.

The candidates are the desirable ``source: replay`` lines. Before training each is scored with the model
as loaded (the parent adapter, or the base), in eval mode without gradient: its mean token NLL over its
completion, the per-sample training loss (:func:`losses.batch_losses`). The ``keep`` candidates with the
highest loss stay (ties: the earlier line), the others are dropped before training; window and anchor
lines always stay. In several processes each scores its share of the candidates and the scores are summed
over processes, so every process keeps the same set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from streamengine.training.data import Encoded, Example, collate
from streamengine.training.dist import Dist
from streamengine.training.losses import batch_losses, batches


@dataclass(frozen=True)
class ReplayPick:
    """What the pick did: the candidates, how many stayed, and the seconds scoring them took."""

    candidates: int = 0
    kept: int = 0
    seconds: float = 0.0


def highest(scores: list[float], keep: int) -> list[int]:
    """The positions of the ``keep`` highest scores (ties: the earlier position), in ascending order."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


@torch.no_grad()
def score(model: torch.nn.Module, items: list[Encoded], size: int, pad: int, device: torch.device) -> list[float]:
    """Each item's mean completion NLL, in eval mode."""
    was_training = model.training
    model.eval()
    losses: list[float] = []
    for chunk in batches(items, list(range(len(items))), size):
        losses += batch_losses(model, collate(chunk, pad), device).tolist()
    model.train(was_training)
    return losses


def pick_replay(
    model: torch.nn.Module,
    examples: list[Example],
    encoded: list[Encoded],
    keep: int | None,
    dist: Dist,
    size: int,
    pad: int,
) -> tuple[list[int], ReplayPick]:
    """The rows of ``examples`` to train on, and what the pick did; nothing is scored when ``keep`` is None
    or not below the number of candidates (every row stays)."""
    started = time.monotonic()
    candidates = [i for i, e in enumerate(examples) if e.source == "replay" and e.label > 0]
    if keep is None or keep >= len(candidates):
        return list(range(len(examples))), ReplayPick(len(candidates), len(candidates))
    mine = dist.shard(list(range(len(candidates))))
    scores = torch.zeros(len(candidates), dtype=torch.float64)
    shard = [encoded[candidates[i]] for i in mine]
    scores[mine] = torch.tensor(score(model, shard, size, pad, dist.device), dtype=scores.dtype)
    kept = {candidates[i] for i in highest(dist.sum(scores).tolist(), keep)}
    dropped = set(candidates) - kept
    rows = [i for i in range(len(examples)) if i not in dropped]
    return rows, ReplayPick(len(candidates), len(kept), time.monotonic() - started)
