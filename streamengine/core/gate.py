"""The release gate: does a trained candidate go out? (pure)

A candidate is released when it learned the new window (its holdout loss fell by more than
``min_improvement``, relative) and forgot little (no retention or anchor loss rose by more than
``max_forgetting``, relative). Forgetting = (loss_after - loss_before) / loss_before, the worst set.
"""

from __future__ import annotations

from dataclasses import dataclass

PLASTICITY_SET = "holdout"
RETENTION_SETS = ("retention", "anchor")


@dataclass(frozen=True, slots=True)
class GatePolicy:
    enabled: bool = True
    max_forgetting: float = 0.1
    min_improvement: float = 0.0


@dataclass(frozen=True, slots=True)
class GateDecision:
    release: bool
    reason: str
    improvement: float | None
    forgetting: float | None


def _relative_change(losses: dict[str, float]) -> float:
    before, after = losses["before"], losses["after"]
    return (after - before) / before if before > 0 else after - before


def decide(evals: dict[str, dict[str, float]], policy: GatePolicy) -> GateDecision:
    """Judge a candidate by its eval losses ``{set: {"before": x, "after": y}}``."""
    improvement = -_relative_change(evals[PLASTICITY_SET]) if PLASTICITY_SET in evals else None
    rises = [_relative_change(evals[name]) for name in RETENTION_SETS if name in evals]
    forgetting = max(rises) if rises else None
    if not policy.enabled:
        return GateDecision(True, "gate disabled", improvement, forgetting)
    if improvement is not None and improvement <= policy.min_improvement:
        before, after = evals[PLASTICITY_SET]["before"], evals[PLASTICITY_SET]["after"]
        return GateDecision(
            False,
            f"no improvement on the new window's holdout: loss {before:.4f} -> {after:.4f}"
            f" ({improvement:+.1%}, needs more than {policy.min_improvement:+.1%})",
            improvement,
            forgetting,
        )
    if forgetting is not None and forgetting > policy.max_forgetting:
        worst = max((n for n in RETENTION_SETS if n in evals), key=lambda n: _relative_change(evals[n]))
        before, after = evals[worst]["before"], evals[worst]["after"]
        return GateDecision(
            False,
            f"forgetting {forgetting:.1%} on the {worst} set (loss {before:.4f} -> {after:.4f})"
            f" is over the bound {policy.max_forgetting:.1%}",
            improvement,
            forgetting,
        )
    return GateDecision(True, "passed", improvement, forgetting)
