"""The release gate: does a trained candidate go out? (pure)

A candidate is released when it learned the new window (its holdout loss fell by more than
``min_improvement``, relative), forgot little of the earlier windows (the retention loss rose by at most
``max_forgetting``, relative to the parent: (after - before) / before) and kept the base model's skill:
the anchor set's loss (the user's anchor set or the self-anchor set) rose by at most
``max_base_forgetting`` nats per token from the base model's own loss on it (measured with the adapter
off, so the drift of every version since the base counts, not only this job's). The base's loss on its
own answers is near zero, which makes a relative rise meaningless there; the rise in nats per token is
not (docs/learning.md).
"""

from __future__ import annotations

from dataclasses import dataclass

PLASTICITY_SET = "holdout"
RETENTION_SET = "retention"
BASE_SET = "anchor"


@dataclass(frozen=True, slots=True)
class GatePolicy:
    enabled: bool = True
    max_forgetting: float = 0.1
    min_improvement: float = 0.0
    max_base_forgetting: float = 0.5


@dataclass(frozen=True, slots=True)
class GateDecision:
    release: bool
    reason: str
    improvement: float | None
    forgetting: float | None
    base_forgetting: float | None = None


def _relative_change(losses: dict[str, float]) -> float:
    before, after = losses["before"], losses["after"]
    return (after - before) / before if before > 0 else after - before


def base_forgetting(evals: dict[str, dict[str, float]]) -> float | None:
    """The anchor set's loss after minus its loss at the base model (``before`` when the base was not scored)."""
    losses = evals.get(BASE_SET)
    return None if losses is None else losses["after"] - losses.get("base", losses["before"])


def decide(evals: dict[str, dict[str, float]], policy: GatePolicy) -> GateDecision:
    """Judge a candidate by its eval losses ``{set: {"before": x, "after": y[, "base": z]}}``."""
    improvement = -_relative_change(evals[PLASTICITY_SET]) if PLASTICITY_SET in evals else None
    forgetting = _relative_change(evals[RETENTION_SET]) if RETENTION_SET in evals else None
    drift = base_forgetting(evals)

    def decision(release: bool, reason: str) -> GateDecision:
        return GateDecision(release, reason, improvement, forgetting, drift)

    if not policy.enabled:
        return decision(True, "gate disabled")
    if improvement is not None and improvement <= policy.min_improvement:
        before, after = evals[PLASTICITY_SET]["before"], evals[PLASTICITY_SET]["after"]
        return decision(
            False,
            f"no improvement on the new window's holdout: loss {before:.4f} -> {after:.4f}"
            f" ({improvement:+.1%}, needs more than {policy.min_improvement:+.1%})",
        )
    if forgetting is not None and forgetting > policy.max_forgetting:
        before, after = evals[RETENTION_SET]["before"], evals[RETENTION_SET]["after"]
        return decision(
            False,
            f"forgetting {forgetting:.1%} on the retention set (loss {before:.4f} -> {after:.4f})"
            f" is over the bound {policy.max_forgetting:.1%}",
        )
    if drift is not None and drift > policy.max_base_forgetting:
        after = evals[BASE_SET]["after"]
        return decision(
            False,
            f"base skill lost: the anchor set's loss rose {after - drift:.4f} -> {after:.4f} from the base model"
            f" (+{drift:.4f} nats per token), over the bound {policy.max_base_forgetting:.4f}",
        )
    return decision(True, "passed")
