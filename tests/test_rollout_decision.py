"""The canary judgement (pure): outcomes, capped counts, the posterior test, each decision rule, membership."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streamengine.config.settings import RolloutSettings, load_settings
from streamengine.contract.events import FeedbackEvent
from streamengine.core.rollout import (
    Action,
    Outcome,
    RolloutPolicy,
    Rule,
    SideCounts,
    UserTally,
    canary_nodes,
    contributor,
    decide,
    is_canary,
    outcome,
    prob_worse,
    side_counts,
)
from streamengine.errors import ConfigError

POLICY = RolloutPolicy()
START = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def event(**fields: Any) -> FeedbackEvent:
    base: dict[str, Any] = {"event_id": "e1", "model": "m", "prompt": "2+2?", "response": "4", "kind": "thumbs_up"}
    return FeedbackEvent.model_validate({**base, **fields})


def crowd(events: int, negatives: int, prefix: str = "u") -> list[UserTally]:
    """``events`` feedback events from as many users, the first ``negatives`` of them negative."""
    return [UserTally(f"{prefix}{i}", 1, int(i < negatives)) for i in range(events)]


def counts(events: int, negatives: int) -> SideCounts:
    return side_counts(crowd(events, negatives), POLICY.max_user_share)


def judge(canary: SideCounts, production: SideCounts, after: timedelta = timedelta(hours=1), **kw: Any) -> Any:
    failed = kw.pop("failed_nodes", 0)
    policy = replace(POLICY, **kw)
    return decide(canary, production, failed_nodes=failed, started_at=START, now=START + after, policy=policy)


# --- outcomes and contributors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "thumbs_up"}, Outcome.POSITIVE),
        ({"kind": "thumbs_down"}, Outcome.NEGATIVE),
        ({"kind": "correction", "correction": "four"}, Outcome.NEGATIVE),
        ({"kind": "rating", "rating": 5}, Outcome.POSITIVE),
        ({"kind": "rating", "rating": 4}, Outcome.POSITIVE),
        ({"kind": "rating", "rating": 3}, Outcome.NEUTRAL),
        ({"kind": "rating", "rating": 2}, Outcome.NEGATIVE),
        ({"kind": "rating", "rating": 1}, Outcome.NEGATIVE),
    ],
)
def test_outcome_of_each_kind_and_rating(fields: dict[str, Any], expected: Outcome) -> None:
    e = event(**fields)
    assert outcome(e.kind, e.rating) is expected


def test_contributor_is_the_user_else_the_session() -> None:
    assert contributor("alice", "s1") == "alice"
    assert contributor(None, "s1") == "s1"
    assert contributor(None, None) is None


# --- counts and the per-user cap ----------------------------------------------------------------------


def test_counts_of_many_light_users_are_not_capped() -> None:
    side = counts(1000, 100)
    assert (side.events, side.negatives, side.contributors) == (1000, 100, 1000)
    assert (side.effective_events, side.effective_negatives, side.negative_share) == (1000, 100, 0.1)


def test_a_flooding_user_holds_at_most_the_share_with_their_own_negative_share() -> None:
    side = side_counts([*crowd(990, 99), UserTally("flood", 5000, 5000)], 0.01)
    assert side.events == 5990 and side.negatives == 5099
    flood = side.effective_events - 990
    assert flood == pytest.approx(0.01 * side.effective_events) and side.effective_events == pytest.approx(1000)
    assert side.effective_negatives == pytest.approx(99 + flood)  # all of what counts of theirs is negative


def test_anonymous_feedback_is_never_capped() -> None:
    side = side_counts([UserTally(None, 5000, 2500), *crowd(100, 10)], 0.01)
    assert side.effective_events == pytest.approx(5100) and side.contributors == 100


def test_a_side_without_events_has_no_share() -> None:
    side = side_counts([], 0.01)
    assert side.events == 0 and side.negative_share is None


def test_heaviest_contributors_plus_the_rest_summed_give_the_same_counts() -> None:
    """What side_counts promises a store: with more than ceil(1/share) contributors, the heaviest that many
    individually and the rest as one anonymous tally give the same counts."""
    rng = random.Random(3)
    for _ in range(50):
        share = rng.choice([0.01, 0.05, 0.2, 0.3])
        keep = -(-100 // round(share * 100))  # ceil(1 / share)
        tallies = []
        for i in range(keep + rng.randint(1, 300)):
            events = int(rng.paretovariate(1.2))
            tallies.append(UserTally(f"u{i}", events, rng.randint(0, events)))
        ranked = sorted(tallies, key=lambda t: t.events, reverse=True)
        rest = ranked[keep:]
        lumped = [*ranked[:keep], UserTally(None, sum(t.events for t in rest), sum(t.negatives for t in rest))]
        full, short = side_counts(tallies, share), side_counts(lumped, share)
        assert short.effective_events == pytest.approx(full.effective_events)
        assert short.effective_negatives == pytest.approx(full.effective_negatives)


# --- the posterior probability ------------------------------------------------------------------------


def _monte_carlo(canary: tuple[float, float], production: tuple[float, float], margin: float) -> float:
    rng, draws = random.Random(11), 100_000
    hits = sum(rng.betavariate(*canary) - rng.betavariate(*production) > margin for _ in range(draws))
    return hits / draws


@pytest.mark.parametrize(
    ("canary", "production"),
    [((21, 181), (181, 1621)), ((31, 171), (181, 1621)), ((6, 6), (101, 901)), ((61, 541), (1001, 9001))],
)
def test_probability_agrees_with_sampling(canary: tuple[float, float], production: tuple[float, float]) -> None:
    assert prob_worse(canary, production, 0.02) == pytest.approx(_monte_carlo(canary, production, 0.02), abs=0.005)


def test_probability_is_complementary_and_exact_far_apart() -> None:
    a, b = (31.0, 171.0), (181.0, 1621.0)
    assert prob_worse(a, b, 0.0) + prob_worse(b, a, 0.0) == pytest.approx(1.0, abs=1e-4)
    assert prob_worse(a, b, 0.01) > prob_worse(a, b, 0.02) > prob_worse(a, b, 0.03)
    assert prob_worse((501.0, 501.0), (101.0, 901.0), 0.02) == 1.0
    assert prob_worse((1.0, 1001.0), (101.0, 901.0), 0.02) == 0.0


# --- the decision rules -------------------------------------------------------------------------------


def test_promotes_an_equal_canary_once_not_worse_with_confidence() -> None:
    d = judge(counts(2000, 200), counts(18000, 1800))
    assert (d.action, d.rule) == (Action.PROMOTE, Rule.NOT_WORSE)
    assert d.prob_worse <= 0.05 and d.canary.negative_share == 0.1 and d.production.events == 18000
    assert "not worse by more than 0.02" in d.reason and "canary 10.0% negative of 2000 events" in d.reason


def test_rolls_back_a_canary_worse_by_more_than_the_margin() -> None:
    d = judge(counts(1000, 200), counts(9000, 900))
    assert (d.action, d.rule) == (Action.ROLLBACK, Rule.REGRESSION) and d.prob_worse >= 0.95


def test_waits_while_the_evidence_is_in_between() -> None:
    d = judge(counts(300, 33), counts(2700, 270))
    assert (d.action, d.rule) == (Action.WAIT, Rule.PENDING) and 0.05 < d.prob_worse < 0.95
    assert "P >= 0.95 either way" in d.reason


def test_no_evidence_decision_before_min_events_on_each_side() -> None:
    awful = counts(150, 120)  # 80% negative, but fewer than min_events
    d = judge(awful, counts(9000, 900))
    assert (d.action, d.rule) == (Action.WAIT, Rule.PENDING) and d.prob_worse > 0.999
    assert "waiting for 200 events on each side" in d.reason
    d = judge(counts(2000, 200), counts(150, 15))  # production short
    assert d.action is Action.WAIT
    assert judge(awful, counts(9000, 900), min_events=100).action is Action.ROLLBACK


def test_failed_nodes_over_the_limit_roll_back_at_once() -> None:
    fine = (counts(2000, 200), counts(18000, 1800))
    d = judge(counts(0, 0), counts(0, 0), failed_nodes=1)
    assert (d.action, d.rule) == (Action.ROLLBACK, Rule.FAILED_NODES) and "1 nodes failed" in d.reason
    assert judge(*fine, failed_nodes=1).action is Action.ROLLBACK  # even when the feedback says promote
    assert judge(*fine, failed_nodes=2, max_failed_nodes=2).action is Action.PROMOTE


def test_timeout_takes_the_configured_action_after_max_duration() -> None:
    thin = (counts(50, 5), counts(450, 45))
    assert judge(*thin, after=timedelta(hours=23, minutes=59)).action is Action.WAIT
    d = judge(*thin, after=timedelta(hours=24))
    assert (d.action, d.rule) == (Action.ROLLBACK, Rule.TIMEOUT) and d.elapsed_s == 86400
    d = judge(*thin, after=timedelta(hours=25), timeout_action="promote")
    assert (d.action, d.rule) == (Action.PROMOTE, Rule.TIMEOUT)
    late_but_clear = judge(counts(1000, 200), counts(9000, 900), after=timedelta(days=2), timeout_action="promote")
    assert late_but_clear.rule is Rule.REGRESSION  # evidence, when there is some, wins over the timeout


def test_the_decision_records_as_json() -> None:
    record = json.loads(json.dumps(asdict(judge(counts(2000, 200), counts(18000, 1800)))))
    assert record["action"] == "promote" and record["rule"] == "not_worse"
    assert record["canary"]["events"] == 2000 and record["production"]["negative_share"] == 0.1
    assert set(record) >= {"prob_worse", "failed_nodes", "elapsed_s", "reason"}


def test_one_user_flooding_negatives_cannot_roll_back_an_equal_canary() -> None:
    flooded = [*crowd(4000, 400), UserTally("troll", 20_000, 20_000)]
    production = counts(18000, 1800)
    capped = side_counts(flooded, POLICY.max_user_share)
    assert capped.negative_share == pytest.approx(0.1045)  # moved by less than a quarter of the margin
    assert judge(capped, production).action is Action.PROMOTE
    uncapped = side_counts(flooded, 1.0)
    assert judge(uncapped, production).action is Action.ROLLBACK  # what the cap prevents


def test_one_user_flooding_praise_cannot_promote_a_worse_canary() -> None:
    flooded = [*crowd(2000, 300), UserTally("shill", 20_000, 0)]  # 15% against 10%
    production = counts(18000, 1800)
    assert judge(side_counts(flooded, POLICY.max_user_share), production).action is Action.ROLLBACK
    assert judge(side_counts(flooded, 1.0), production).action is Action.PROMOTE


def test_a_flooder_alone_does_not_reach_min_events() -> None:
    side = side_counts([*crowd(50, 5), UserTally("troll", 10_000, 10_000)], POLICY.max_user_share)
    assert side.effective_events < POLICY.min_events
    assert judge(side, counts(9000, 900)).action is Action.WAIT


# --- canary membership --------------------------------------------------------------------------------


def test_membership_is_stable_and_independent_of_order() -> None:
    nodes = [f"node-{i}" for i in range(200)]
    picked = canary_nodes(nodes, "llama", 0.1)
    assert picked == canary_nodes(list(reversed(nodes)), "llama", 0.1) == canary_nodes(nodes, "llama", 0.1)
    assert picked == sorted(n for n in nodes if is_canary(n, "llama", 0.1))
    assert 8 <= len(picked) <= 35  # about a tenth
    assert canary_nodes(nodes, "mistral", 0.1) != picked  # each line its own draw


def test_growing_the_fleet_keeps_the_canaries_it_had() -> None:
    small = canary_nodes([f"node-{i}" for i in range(100)], "llama", 0.1)
    large = canary_nodes([f"node-{i}" for i in range(300)], "llama", 0.1)
    assert set(small) <= set(large)


def test_at_least_one_canary_and_never_the_whole_fleet() -> None:
    lone = canary_nodes(["only"], "llama", 0.1)
    assert lone == ["only"]
    for size in range(2, 12):
        picked = canary_nodes([f"n{i}" for i in range(size)], "llama", 0.1)
        assert 1 <= len(picked) < size
    assert canary_nodes(["a", "b", "c"], "llama", 0.99) != ["a", "b", "c"]
    assert canary_nodes(["a", "b", "c"], "llama", 1.0) == ["a", "b", "c"]


def test_fraction_zero_turns_canaries_off() -> None:
    assert canary_nodes(["a", "b"], "llama", 0.0) == [] and canary_nodes([], "llama", 0.1) == []
    assert not is_canary("a", "llama", 0.0)


# --- settings -----------------------------------------------------------------------------------------


def test_policy_defaults_are_the_settings_defaults() -> None:
    settings = RolloutSettings()
    for name in RolloutPolicy.__dataclass_fields__:
        assert getattr(settings, name) == getattr(POLICY, name), name


def test_rollout_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_ROLLOUT__MAX_DURATION", "3600")
    monkeypatch.setenv("STREAMENGINE_ROLLOUT__TIMEOUT_ACTION", "promote")
    rollout = load_settings().rollout
    assert rollout.max_duration == timedelta(hours=1) and rollout.timeout_action == "promote"
    monkeypatch.setenv("STREAMENGINE_ROLLOUT__MAX_DURATION", "PT2H")
    assert load_settings().rollout.max_duration == timedelta(hours=2)
    for name, bad in [("CONFIDENCE", "0.5"), ("CANARY_FRACTION", "1.5"), ("MAX_DURATION", "0"), ("MIN_EVENTS", "0")]:
        monkeypatch.setenv(f"STREAMENGINE_ROLLOUT__{name}", bad)
        with pytest.raises(ConfigError, match=f"STREAMENGINE_ROLLOUT__{name}"):
            load_settings()
        monkeypatch.delenv(f"STREAMENGINE_ROLLOUT__{name}")
