"""Feedback event -> weighted training sample (pure), with the length limits of ``samples.*``."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

from streamengine.contract.events import Feedback, FeedbackEvent, FeedbackKind, Message
from streamengine.errors import EventRejected

Overlength = Literal["reject", "truncate"]


@dataclass(frozen=True, slots=True)
class SamplePolicy:
    """How feedback kinds become samples; built from ``samples.*`` settings."""

    kind_weights: dict[str, float]
    positive_rating_min: int = 4
    negative_rating_max: int = 2
    holdout_fraction: float = 0.0
    max_prompt_chars: int | None = None
    """Most characters of a prompt (a string, or the messages' contents together); None: no limit."""
    max_completion_chars: int | None = None
    """Most characters of the completion (the response, or the correction of a correction)."""
    overlength: Overlength = "reject"
    """``reject``: the event goes to the DLQ (``too_long``); ``truncate``: the prompt loses characters from its
    start, the completion from its end (as training truncates tokens), and the sample names the cut fields."""


class Sample(msgspec.Struct, frozen=True, gc=False):
    """A stored sample. ``label`` is +1 (desirable), -1 (undesirable) or 0 (neutral).

    Only desirable samples are trained on with the supervised objective; the others are kept for
    objectives that use negative feedback. (A frozen msgspec struct: ingest makes one per event, ten times
    faster than a frozen dataclass.)
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
    truncated: tuple[str, ...] = ()
    """Fields cut to the policy's length limits (``prompt``, ``completion``); not stored."""

    @property
    def trainable(self) -> bool:
        return self.label > 0 and self.weight > 0


_json_dumps = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), made once


def _json_text(prompt: str | list[Message]) -> str:
    """The prompt as ``json.dumps(prompt, ensure_ascii=False)`` writes it; strings and messages of strings (all
    but rare extra fields) in C, in a third of the time, to the same text (tests/test_core.py)."""
    try:
        if isinstance(prompt, str):
            return msgspec.json.encode(prompt).decode()
        if all(type(value) is str for message in prompt for value in message.values()):  # numbers print otherwise
            return msgspec.json.format(msgspec.json.encode(prompt), indent=0).decode()
    except UnicodeEncodeError:  # a lone surrogate, which only Python code can put there
        pass
    return _json_dumps(prompt)


def _label_and_scale(kind: FeedbackKind, rating: int | None, policy: SamplePolicy) -> tuple[int, float]:
    if kind is FeedbackKind.THUMBS_UP or kind is FeedbackKind.CORRECTION:
        return 1, 1.0
    if kind is FeedbackKind.THUMBS_DOWN:
        return -1, 1.0
    rating = rating or 0
    if rating >= policy.positive_rating_min:
        # 5 of 5 counts fully; each star below the top counts half as much again.
        return 1, 0.5 ** (5 - rating)
    if rating <= policy.negative_rating_max:
        return -1, 0.5 ** (rating - 1)
    return 0, 1.0


def _prompt_chars(prompt: str | list[Message]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def _keep_end(prompt: str | list[Message], limit: int) -> str | list[Message]:
    """The last ``limit`` characters of a prompt: earlier messages go first, then the start of the next one."""
    if isinstance(prompt, str):
        return prompt[len(prompt) - limit :]
    kept: list[Message] = []
    for message in reversed(prompt):
        if limit <= 0:
            break
        content = message["content"]
        if len(content) > limit:
            message = {**message, "content": content[len(content) - limit :]}
        kept.append(message)
        limit -= len(message["content"])
    return kept[::-1]


def _over(field: str, length: int, setting: str, limit: int) -> EventRejected:
    return EventRejected("too_long", f"{field} is {length} characters, over samples.{setting} ({limit})")


def to_sample(event: Feedback | FeedbackEvent, policy: SamplePolicy) -> Sample:
    """Turn a validated event into the sample stored for it.

    Raises :class:`EventRejected` (``too_long``) when a text is over the policy's limit and it rejects.
    """
    fields = event if isinstance(event, Feedback) else Feedback.of(event)
    kind = fields.kind
    label, scale = _label_and_scale(kind, fields.rating, policy)
    is_correction = kind is FeedbackKind.CORRECTION
    completion = (fields.correction if is_correction else fields.response) or ""
    weight = policy.kind_weights.get(kind, 1.0) * scale * (fields.weight or 1.0)
    prompt: str | list[Message] = fields.prompt
    truncated: tuple[str, ...] = ()
    limit = policy.max_prompt_chars
    if limit is not None and (length := _prompt_chars(prompt)) > limit:
        if policy.overlength == "reject":
            raise _over("prompt", length, "max_prompt_chars", limit)
        prompt = _keep_end(prompt, limit)
        truncated += ("prompt",)
    limit = policy.max_completion_chars
    if limit is not None and len(completion) > limit:
        if policy.overlength == "reject":
            field = "correction" if is_correction else "response"
            raise _over(field, len(completion), "max_completion_chars", limit)
        completion = completion[:limit]
        truncated += ("completion",)
    holdout = is_holdout(fields.event_id, policy.holdout_fraction)
    return Sample(  # positional: half the keyword call's cost, once per ingested event
        fields.event_id, fields.model, str(kind), _json_text(prompt), completion, weight, label, fields.user_id,
        fields.session_id, fields.adapter_version, fields.timestamp, holdout, truncated,
    )  # fmt: skip


_FIRST_UINT32 = struct.Struct(">I").unpack_from


def _bucket(event_id: str) -> float:
    """A stable position in [0, 1) from the event id alone: the first 4 bytes of its SHA-256, big-endian."""
    return _FIRST_UINT32(hashlib.sha256(event_id.encode()).digest())[0] / 2**32


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
