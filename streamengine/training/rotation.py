"""Anchor rotation (TrainSpec ``anchor_per_epoch``): the samples file holds the whole anchor pool and each
epoch trains on every other line and a fresh seeded draw of ``anchor_per_epoch`` anchor lines.

A job then sees many different anchors (what keeps the base skill: docs/learning.md, "Anchor rotation") at the
step count of a job with a few. Every process draws alike (the same seeded generator), so DDP stays in step.
"""

from __future__ import annotations

import torch


def lines_per_epoch(lines: int, anchors: list[int], per_epoch: int | None) -> int:
    """How many lines one epoch trains on: all, or the non-anchor lines and ``per_epoch`` anchors."""
    if per_epoch is None or len(anchors) <= per_epoch:
        return lines
    return lines - len(anchors) + per_epoch


def epoch_rows(lines: int, anchors: list[int], per_epoch: int | None, generator: torch.Generator) -> list[int]:
    """The rows of one epoch in file order (the epoch shuffles them): every line, or every line that is not in
    ``anchors`` and ``per_epoch`` of those drawn with ``generator`` (which is not touched without rotation)."""
    if lines_per_epoch(lines, anchors, per_epoch) == lines:
        return list(range(lines))
    assert per_epoch is not None
    drawn = torch.randperm(len(anchors), generator=generator)[:per_epoch].tolist()
    skipped = set(anchors) - {anchors[j] for j in drawn}
    return [i for i in range(lines) if i not in skipped]
