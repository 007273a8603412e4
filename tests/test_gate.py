"""The release gate, holdout assignment and the per-user weight cap (pure)."""

from __future__ import annotations

import pytest

from streamengine.core.gate import GatePolicy, decide
from streamengine.core.samples import Sample, is_holdout, split_holdout, user_share_factors

POLICY = GatePolicy(enabled=True, max_forgetting=0.1, min_improvement=0.0)


def test_releases_a_candidate_that_learned_and_kept() -> None:
    d = decide({"holdout": {"before": 2.0, "after": 1.5}, "retention": {"before": 1.0, "after": 1.05}}, POLICY)
    assert d.release and d.reason == "passed"
    assert d.improvement == pytest.approx(0.25) and d.forgetting == pytest.approx(0.05)


def test_rejects_no_improvement_on_holdout() -> None:
    d = decide({"holdout": {"before": 2.0, "after": 2.0}}, POLICY)
    assert not d.release and "no improvement" in d.reason and "2.0000 -> 2.0000" in d.reason


def test_rejects_forgetting_over_the_bound_on_the_retention_set() -> None:
    evals = {"holdout": {"before": 2.0, "after": 1.0}, "retention": {"before": 1.0, "after": 1.5}}
    d = decide(evals, POLICY)
    assert not d.release and d.forgetting == pytest.approx(0.5)
    assert "retention set" in d.reason and "50.0%" in d.reason and "10.0%" in d.reason


def test_base_forgetting_is_the_anchor_loss_rise_from_the_base_model() -> None:
    """Measured from the base (adapter off), in nats per token: the drift of every version since the base."""
    kept = {"holdout": {"before": 2.0, "after": 1.0}, "anchor": {"base": 0.002, "before": 0.05, "after": 0.08}}
    d = decide(kept, POLICY)
    assert d.release and d.base_forgetting == pytest.approx(0.078)  # a 40x relative rise, 0.078 nats: kept
    lost = {"holdout": {"before": 2.0, "after": 1.0}, "anchor": {"base": 0.002, "before": 0.05, "after": 0.9}}
    d = decide(lost, POLICY)
    assert not d.release and d.base_forgetting == pytest.approx(0.898)
    assert "base skill lost" in d.reason and "0.0020 -> 0.9000" in d.reason and "0.5000" in d.reason
    # without the base's loss (an older trainer), the parent's stands in
    assert decide({"anchor": {"before": 0.5, "after": 0.55}}, POLICY).base_forgetting == pytest.approx(0.05)
    assert decide(lost, GatePolicy(max_base_forgetting=1.0)).release


def test_forgetting_exactly_at_the_bound_is_released() -> None:
    d = decide(
        {"holdout": {"before": 2.0, "after": 1.0}, "retention": {"before": 1.0, "after": 1.1}},
        GatePolicy(max_forgetting=0.1 + 1e-12),
    )
    assert d.release


def test_without_eval_sets_or_when_disabled_everything_passes() -> None:
    assert decide({}, POLICY).release
    d = decide({"holdout": {"before": 1.0, "after": 3.0}}, GatePolicy(enabled=False))
    assert d.release and d.improvement == pytest.approx(-2.0)


def test_holdout_assignment_is_stable_and_near_the_fraction() -> None:
    ids = [f"event-{i}" for i in range(20_000)]
    held = [i for i in ids if is_holdout(i, 0.1)]
    assert 0.09 < len(held) / len(ids) < 0.11
    assert held == [i for i in ids if is_holdout(i, 0.1)]
    assert not any(is_holdout(i, 0.0) for i in ids[:100])
    assert set(held) <= {i for i in ids if is_holdout(i, 0.5)}  # monotone in the fraction


def _sample(event_id: str, label: int = 1, holdout: bool = False) -> Sample:
    return Sample(event_id, "m", "thumbs_up", '"p"', "c", 1.0, label, None, None, None, None, holdout)


def test_small_windows_top_up_their_holdout_to_the_minimum() -> None:
    window = [_sample(f"e{i}", holdout=i < 3) for i in range(40)] + [_sample("neg", label=-1)]
    train, holdout = split_holdout(window, 20)
    assert len(holdout) == 20 and len(train) == 21 and {s.event_id for s in holdout} >= {"e0", "e1", "e2"}
    assert split_holdout(window, 20) == (train, holdout)  # deterministic
    assert "neg" in {s.event_id for s in train}  # only desirable samples are moved
    small_train, small_holdout = split_holdout(window[:10], 20)  # never more than half of the training samples
    assert len(small_holdout) == 3 + 3 and len(small_train) == 4
    assert split_holdout(window, 0) == (window[3:], window[:3])


def test_user_cap_brings_the_flooder_to_the_share() -> None:
    weights = [("flooder", 1.0)] * 50 + [(f"u{i}", 1.0) for i in range(10)]
    factors = user_share_factors(weights, 0.2)
    assert set(factors) == {"flooder"}
    new = {u: w * factors.get(u, 1.0) for u, w in weights}
    flooder = 50 * factors["flooder"]
    assert flooder / (flooder + 10) == pytest.approx(0.2)
    assert new["u1"] == 1.0


def test_user_cap_water_fills_several_heavy_users_and_ignores_anonymous() -> None:
    weights = [("a", 30.0), ("b", 20.0), ("c", 2.0), ("d", 2.0), (None, 6.0)]
    factors = user_share_factors(weights, 0.25)
    capped = {u: w * factors.get(u, 1.0) for u, w in weights if u}
    total = sum(capped.values()) + 6.0
    assert capped["a"] == pytest.approx(capped["b"]) == pytest.approx(0.25 * total)
    assert "c" not in factors and None not in factors


def test_user_cap_leaves_balanced_or_unmeetable_windows_alone() -> None:
    assert user_share_factors([("a", 1.0), ("b", 1.0), ("c", 1.0)], 0.5) == {}
    assert user_share_factors([("a", 1.0), ("b", 1.0)], 0.2) == {}  # 2 users cannot each hold 20%
    assert user_share_factors([("a", 3.0), ("b", 1.0)], 0.2) == {"a": pytest.approx(1 / 3)}
    assert user_share_factors([("a", 5.0)], 1.0) == {}
