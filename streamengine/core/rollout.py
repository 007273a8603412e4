"""The canary judgement (pure): promote, roll back or wait, from the outcomes of feedback naming each version.

The test is Bayesian. Each side's share of negative outcomes gets a uniform Beta(1, 1) prior and a
beta-binomial posterior; the decision reads P(p_canary - p_production > max_regression), integrated
numerically on a grid (:func:`prob_worse`): deterministic, so the same counts give the same decision
after a restart, and faster than sampling to the same accuracy. Why not an SPRT: the question is
"worse by more than a margin?" between two proportions, neither known in advance (an SPRT fixes p0 and
p1 of one); the posterior probability is a number an operator can read in the record; and the test may
look after every ingest batch. Looking that often makes any sequential test err more than its nominal
level, so both the promotion and the evidence rollback wait for ``min_events`` on each side;
``bench/rollout.py`` measures the error rates that result (docs/serving.md, Canary judgement). Pure
Python (``math`` only): it runs in the engine without numpy or scipy.

One user cannot decide a rollout: each side's counts are taken after the per-user share cap that
training uses (:func:`~streamengine.core.samples.user_share_factors`), with the judgement's own, tighter
share (``rollout.max_user_share``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from streamengine.contract.events import FeedbackKind
from streamengine.core.samples import user_share_factors


class Outcome(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    NEUTRAL = "neutral"


def outcome(kind: FeedbackKind | str, rating: int | None = None) -> Outcome:
    """What a feedback event says about the answer: thumbs up and ratings 4-5 are positive, thumbs down,
    ratings 1-2 and corrections (the answer needed fixing) negative, a rating of 3 neutral."""
    if kind == FeedbackKind.THUMBS_UP:
        return Outcome.POSITIVE
    if kind in (FeedbackKind.THUMBS_DOWN, FeedbackKind.CORRECTION):
        return Outcome.NEGATIVE
    if rating is not None and rating >= 4:
        return Outcome.POSITIVE
    if rating is not None and rating <= 2:
        return Outcome.NEGATIVE
    return Outcome.NEUTRAL


def contributor(user_id: str | None, session_id: str | None) -> str | None:
    """Whose feedback an event is, for the share cap: the user, else the session (the feedback topic's key).
    None: nobody's, never capped (as in training), so a deployment that wants the protection sends ids."""
    return user_id if user_id is not None else session_id


@dataclass(frozen=True, slots=True)
class UserTally:
    """One contributor's outcomes for one version: ``events`` of every outcome, ``negatives`` among them."""

    user: str | None
    events: int
    negatives: int


@dataclass(frozen=True, slots=True)
class SideCounts:
    """One side (canary or production) as judged: raw counts, and the counts after the per-user cap."""

    events: int
    negatives: int
    contributors: int
    """Distinct non-anonymous contributors."""
    effective_events: float
    """Events after the per-user cap: what ``min_events`` and the test see."""
    effective_negatives: float
    negative_share: float | None
    """effective_negatives / effective_events; None without events."""


def side_counts(tallies: Iterable[UserTally], max_user_share: float) -> SideCounts:
    """A side's counts, no contributor holding more than ``max_user_share`` of its (capped) events.

    Each contributor's events and negatives are scaled by the same factor, the one training's water-filling
    gives for event counts, so a capped flooder keeps their own negative share but only that much weight.
    At most 1/max_user_share contributors are ever capped (each then holds exactly that share), so with more
    contributors than ``ceil(1 / max_user_share)`` a store may pass the heaviest that many and the rest summed
    as one anonymous tally (user None): the counts are the same. With fewer, every contributor counts as
    much as the lightest one (training's rule): small fleets of testers raise ``rollout.max_user_share``.
    """
    tallies = list(tallies)
    factors = user_share_factors([(t.user, float(t.events)) for t in tallies], max_user_share)
    events = negatives = 0
    effective_events = effective_negatives = 0.0
    for tally in tallies:
        factor = factors.get(tally.user, 1.0) if tally.user is not None else 1.0
        events += tally.events
        negatives += tally.negatives
        effective_events += tally.events * factor
        effective_negatives += tally.negatives * factor
    users = len({t.user for t in tallies if t.user is not None})
    share = effective_negatives / effective_events if effective_events > 0 else None
    return SideCounts(events, negatives, users, effective_events, effective_negatives, share)


_SPAN_SD = 10.0
"""The grid covers each posterior's mean +- this many standard deviations (beyond: < 2e-5 of the mass for
the most skewed posterior, Beta(1, b), far less for the others)."""
_POINTS_PER_SD = 8
"""Grid spacing: this many points per standard deviation of the narrower posterior (error ~ 3e-5) ..."""
_MAX_POINTS = 4000
"""... but never more points than this (then the narrow one is nearly a point on the wide one's scale)."""


def _mean_sd(a: float, b: float) -> tuple[float, float]:
    n = a + b
    return a / n, math.sqrt(a * b / (n * n * (n + 1)))


def _log_mass(a: float, b: float, left: float, step: float) -> float:
    """Log of a bin's Beta(a, b) mass (up to a constant): its width inside [0, 1] times the density there."""
    right, width = left + step, 0.0
    if left < 0 or right > 1:  # a bin over an end of the support holds its inner part only
        left, right = max(left, 0.0), min(right, 1.0)
        if right <= left:
            return -math.inf
        width = math.log((right - left) / step)
    x = (left + right) / 2
    return width + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x)


def _bin_masses(a: float, b: float, grid: tuple[float, float, int], shift: float, lo: float, hi: float) -> list[float]:
    """Beta(a, b) shifted by ``shift`` as probability masses of the grid's bins (midpoint rule, normalised);
    bins outside [lo, hi] (beyond its span) hold nothing."""
    start, step, points = grid
    first, last = max(0, math.floor((lo - start) / step)), min(points, math.ceil((hi - start) / step))
    middle = start - shift + 0.5 * step  # of bin 0; the bins between the two ends lie inside [0, 1]
    xs = (middle + i * step for i in range(first + 1, last - 1))
    inner = [(a - 1) * math.log(x) + (b - 1) * math.log1p(-x) for x in xs]
    ends = [_log_mass(a, b, start + i * step - shift, step) for i in (first, last - 1)]
    logs = [ends[0], *inner, ends[1]] if last - first > 1 else ends[:1]
    top = max(logs)
    masses = [math.exp(v - top) for v in logs]
    total = sum(masses)
    return [0.0] * first + [m / total for m in masses] + [0.0] * (points - last)


def prob_worse(canary: tuple[float, float], production: tuple[float, float], margin: float) -> float:
    """P(X - Y > margin) for X ~ Beta(*canary), Y ~ Beta(*production) (parameters >= 1), independent.

    Both posteriors, Y shifted by the margin, are put as bin masses on one grid fine enough for the narrower;
    P(X > Y + margin) is then a sum over bins of X's mass times the mass of Y + margin below (half of it in
    the same bin). Deterministic; about 0.5 ms. On 74 pairs of posteriors (tests/test_rollout_decision.py
    has a few) it agreed with 8 million draws of sampling within the draws' noise (at most 4e-4 apart).
    """
    (a1, b1), (a2, b2) = canary, production
    m1, s1 = _mean_sd(a1, b1)
    m2, s2 = _mean_sd(a2, b2)
    lo1, hi1 = max(0.0, m1 - _SPAN_SD * s1), min(1.0, m1 + _SPAN_SD * s1)
    lo2, hi2 = max(margin, m2 + margin - _SPAN_SD * s2), min(1.0 + margin, m2 + margin + _SPAN_SD * s2)
    if hi1 <= lo2:
        return 0.0
    if lo1 >= hi2:
        return 1.0
    lo, hi = min(lo1, lo2), max(hi1, hi2)
    points = min(_MAX_POINTS, math.ceil((hi - lo) / min(s1, s2) * _POINTS_PER_SD))
    grid = (lo, (hi - lo) / points, points)
    xs = _bin_masses(a1, b1, grid, 0.0, lo1, hi1)
    ys = _bin_masses(a2, b2, grid, margin, lo2, hi2)
    below = worse = 0.0
    for x, y in zip(xs, ys, strict=True):
        worse += x * (below + 0.5 * y)
        below += y
    return min(1.0, max(0.0, worse))


class Action(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"


class Rule(StrEnum):
    """The rule that fired (``pending``: none yet)."""

    NOT_WORSE = "not_worse"
    REGRESSION = "regression"
    FAILED_NODES = "failed_nodes"
    TIMEOUT = "timeout"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """The ``rollout.*`` settings the judgement reads (same names)."""

    max_regression: float = 0.02
    confidence: float = 0.95
    min_events: int = 200
    max_user_share: float = 0.005
    max_failed_nodes: int = 0
    max_duration: timedelta = timedelta(hours=24)
    timeout_action: Literal["rollback", "promote"] = "rollback"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the judgement decided and its numbers, to be recorded as they are (``dataclasses.asdict``)."""

    action: Action
    rule: Rule
    canary: SideCounts
    production: SideCounts
    prob_worse: float
    """P(canary's negative share - production's > max_regression) under the posteriors."""
    failed_nodes: int
    elapsed_s: float
    reason: str


def _posterior(side: SideCounts) -> tuple[float, float]:
    return 1.0 + side.effective_negatives, 1.0 + side.effective_events - side.effective_negatives


def _shares(canary: SideCounts, production: SideCounts) -> str:
    def one(side: SideCounts) -> str:
        share = "n/a" if side.negative_share is None else f"{side.negative_share:.1%}"
        return f"{share} negative of {side.effective_events:.0f} events"

    return f"canary {one(canary)}, production {one(production)}"


def _rule(
    canary: SideCounts, production: SideCounts, failed_nodes: int, elapsed: timedelta, worse: float, p: RolloutPolicy
) -> tuple[Action, Rule, str]:
    margin, confidence = f"{p.max_regression:g}", f"{p.confidence:g}"
    if failed_nodes > p.max_failed_nodes:
        return Action.ROLLBACK, Rule.FAILED_NODES, f"{failed_nodes} nodes failed to load it, over {p.max_failed_nodes}"
    enough = min(canary.effective_events, production.effective_events) >= p.min_events
    if enough and worse >= p.confidence:
        return Action.ROLLBACK, Rule.REGRESSION, f"worse by more than {margin} with P={worse:.3f} >= {confidence}"
    if enough and 1 - worse >= p.confidence:
        return Action.PROMOTE, Rule.NOT_WORSE, f"not worse by more than {margin} with P={1 - worse:.3f} >= {confidence}"
    if elapsed >= p.max_duration:
        return Action(p.timeout_action), Rule.TIMEOUT, f"undecided after {elapsed} (rollout.max_duration)"
    needs = f"{p.min_events} events on each side" if not enough else f"P >= {confidence} either way"
    return Action.WAIT, Rule.PENDING, f"waiting for {needs} (P worse by more than {margin} = {worse:.3f})"


def decide(
    canary: SideCounts,
    production: SideCounts,
    *,
    failed_nodes: int,
    started_at: datetime,
    now: datetime,
    policy: RolloutPolicy,
) -> Decision:
    """Judge a canary, in this order: too many failed nodes -> roll back; with ``min_events`` on each side,
    worse by more than the margin with ``confidence`` -> roll back, not worse by more with ``confidence``
    -> promote; past ``max_duration`` -> the timeout action; else wait. ``now`` is the caller's clock."""
    worse = prob_worse(_posterior(canary), _posterior(production), policy.max_regression)
    elapsed = now - started_at
    action, rule, why = _rule(canary, production, failed_nodes, elapsed, worse, policy)
    reason = f"{why}; {_shares(canary, production)}"
    return Decision(action, rule, canary, production, worse, failed_nodes, elapsed.total_seconds(), reason)


def _position(node_id: str, model: str) -> float:
    """A node's stable place in [0, 1) for one model line: the first 4 bytes of SHA-256(model NUL node)."""
    digest = hashlib.sha256(f"{model}\0{node_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def is_canary(node_id: str, model: str, fraction: float) -> bool:
    """Whether a node is in the canary of a model line by its hash alone (what a node can tell by itself)."""
    return _position(node_id, model) < fraction


def canary_nodes(node_ids: Sequence[str], model: str, fraction: float) -> list[str]:
    """The canary of a fleet (sorted): the nodes :func:`is_canary` selects, but at least one when
    ``fraction`` > 0 (the lowest by hash), and, below a fraction of 1, never every node of a fleet of two
    or more (the highest by hash stays on production, which the canary is compared with)."""
    if fraction <= 0 or not node_ids:
        return []
    ranked = sorted(set(node_ids), key=lambda node: (_position(node, model), node))
    chosen = [node for node in ranked if _position(node, model) < fraction] or ranked[:1]
    if fraction < 1 and len(chosen) == len(ranked) > 1:
        chosen = chosen[:-1]
    return sorted(chosen)
