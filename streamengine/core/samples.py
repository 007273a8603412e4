"""Feedback event -> weighted training sample (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streamengine.events import FeedbackEvent, FeedbackKind


@dataclass(frozen=True, slots=True)
class SamplePolicy:
    """How feedback kinds become samples; built from ``samples.*`` settings."""

    kind_weights: dict[str, float]
    positive_rating_min: int = 4
    negative_rating_max: int = 2
    holdout_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    """A stored sample. ``label`` is +1 (desirable), -1 (undesirable) or 0 (neutral).

    Only desirable samples are trained on with the supervised objective; the others are kept for
    objectives that use negative feedback.
    """

    event_id: str
    model: str
    kind: str
    prompt: str  # JSON text: a string or a list of chat messages
    completion: str
    weight: float
    label: int
    user_id: str | None
    session_id: str | None
    adapter_version: str | None
    event_time: datetime | None
    holdout: bool = False

    @property
    def trainable(self) -> bool:
        return self.label > 0 and self.weight > 0


_json_text = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), made once


def _label_and_scale(event: FeedbackEvent, policy: SamplePolicy) -> tuple[int, float]:
    kind = event.kind
    if kind is FeedbackKind.THUMBS_UP or kind is FeedbackKind.CORRECTION:
        return 1, 1.0
    if kind is FeedbackKind.THUMBS_DOWN:
        return -1, 1.0
    rating = event.rating or 0
    if rating >= policy.positive_rating_min:
        # 5 of 5 counts fully; each star below the top counts half as much again.
        return 1, 0.5 ** (5 - rating)
    if rating <= policy.negative_rating_max:
        return -1, 0.5 ** (rating - 1)
    return 0, 1.0


def to_sample(event: FeedbackEvent, policy: SamplePolicy) -> Sample:
    """Turn a validated event into the sample stored for it."""
    label, scale = _label_and_scale(event, policy)
    kind = str(event.kind)
    completion = event.correction if event.kind is FeedbackKind.CORRECTION else event.response
    weight = policy.kind_weights.get(kind, 1.0) * scale * (event.weight or 1.0)
    prompt: str | list[dict[str, Any]]
    if isinstance(event.prompt, str):
        prompt = event.prompt
    else:  # what model_dump() gives (fields, then extra fields), at a fifth of its cost
        prompt = [{"role": m.role, "content": m.content, **(m.model_extra or {})} for m in event.prompt]
    return Sample(
        event_id=event.event_id,
        model=event.model,
        kind=kind,
        prompt=_json_text(prompt),
        completion=completion or "",
        weight=weight,
        label=label,
        user_id=event.user_id,
        session_id=event.session_id,
        adapter_version=event.adapter_version,
        event_time=event.timestamp,
        holdout=is_holdout(event.event_id, policy.holdout_fraction),
    )


def _bucket(event_id: str) -> float:
    """A stable position in [0, 1) from the event id alone."""
    return int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:4], "big") / 2**32


def is_holdout(event_id: str, fraction: float) -> bool:
    """Stable, content-independent assignment of a sample to the evaluation holdout."""
    return fraction > 0 and _bucket(event_id) < fraction


def split_holdout(window: Sequence[Sample], min_holdout: int) -> tuple[list[Sample], list[Sample]]:
    """A window's (training, holdout) samples, the holdout topped up to ``min_holdout`` desirable ones.

    Small windows hold out too few samples by hash for the gate's loss to mean anything, so the
    desirable training samples next in hash order are moved over, never more than half of them.
    """
    train = [s for s in window if not s.holdout]
    holdout = [s for s in window if s.holdout]
    missing = min_holdout - sum(1 for s in holdout if s.trainable)
    movable = sorted((s for s in train if s.trainable), key=lambda s: _bucket(s.event_id))
    moved = {s.event_id for s in movable[: max(0, min(missing, len(movable) // 2))]}
    if not moved:
        return train, holdout
    return [s for s in train if s.event_id not in moved], holdout + [s for s in train if s.event_id in moved]


def user_share_factors(weights: Sequence[tuple[str | None, float]], max_share: float) -> dict[str, float]:
    """Per-user multipliers so that no user holds more than ``max_share`` of the total weight.

    Water-filling: the heaviest users are brought down to a common cap ``c`` chosen so that
    ``c == max_share * (new total)``. Samples without a user id are nobody's and never capped. When
    the share cannot be met (fewer than 1/max_share users), every user is brought to the lightest
    one's total. Users not in the result keep their weight.
    """
    totals: dict[str, float] = {}
    anonymous = 0.0
    for user, weight in weights:
        if user is None:
            anonymous += weight
        else:
            totals[user] = totals.get(user, 0.0) + weight
    total = anonymous + sum(totals.values())
    if max_share >= 1 or not totals or max(totals.values()) <= max_share * total:
        return {}
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)
    for capped in range(1, len(ranked) + 1):
        rest = anonymous + sum(w for _, w in ranked[capped:])
        denominator = 1 - max_share * capped
        if denominator <= 0 or rest <= 0:
            break  # the share cannot be met by capping only the heaviest
        cap = max_share * rest / denominator
        next_weight = ranked[capped][1] if capped < len(ranked) else 0.0
        if next_weight <= cap <= ranked[capped - 1][1]:
            return {user: cap / w for user, w in ranked[:capped]}
    floor = ranked[-1][1]
    return {user: floor / w for user, w in ranked if w > floor}
