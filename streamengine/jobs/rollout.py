"""The engine's canary judge: every few seconds, judge each model line's running canary (with the line's
``rollout`` settings), apply the decision and refresh the canary gauges (from PostgreSQL, so every replica
reports the same values: aggregate with ``max``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from streamengine import metrics
from streamengine.config.keys import release_signer
from streamengine.config.lines import Lines
from streamengine.config.settings import RolloutSettings, Settings
from streamengine.core.manifest import Signer
from streamengine.core.rollout import Action, Decision, RolloutPolicy
from streamengine.store import fleet, rollouts
from streamengine.store.db import Database

log = logging.getLogger(__name__)

JUDGE_INTERVAL_S = 2.0
"""How often the running canary is judged (each pass reads its counts: a few small queries)."""


def policy_of(settings: RolloutSettings) -> RolloutPolicy:
    return RolloutPolicy(
        max_regression=settings.max_regression,
        confidence=settings.confidence,
        min_events=settings.min_events,
        max_user_share=settings.max_user_share,
        max_failed_nodes=settings.max_failed_nodes,
        max_duration=settings.max_duration,
        timeout_action=settings.timeout_action,
    )


async def judge_once(settings: Settings, db: Database, signer: Signer | None) -> Decision | None:
    """Judge the line's running canary once and apply the decision; None when no canary runs."""
    model = settings.model.name
    nodes = await fleet.nodes(db, settings.rollout.node_timeout_s, model)
    judged = await rollouts.judge(db, model, policy_of(settings.rollout), nodes, settings.kafka.released_topic, signer)
    if judged is None:
        return None
    rollout, decision = judged
    if decision.action is not Action.WAIT:
        log.info("canary %s %s: %s (%s)", model, rollout.version, decision.action, decision.reason)
    return decision


_GAUGES = (
    metrics.CANARY_TRIALS_ENDED,
    metrics.CANARY_RUNNING_SECONDS,
    metrics.CANARY_EVENTS,
    metrics.CANARY_NEGATIVE_SHARE,
    metrics.CANARY_PROB_WORSE,
)


async def refresh_gauges(db: Database, *models: str) -> None:
    """The canary gauges of each of ``models``: trials ended by state and rule; the running trial's age and latest
    numbers."""
    for gauge in _GAUGES:
        gauge.clear()
    for model in dict.fromkeys(models):
        await _line_gauges(db, model)


async def _line_gauges(db: Database, model: str) -> None:
    ended = await rollouts.ended_counts(db, model)
    trial = await rollouts.running(db, model)
    now = await db.fetchval("SELECT now()")
    for (state, rule), count in ended.items():
        metrics.CANARY_TRIALS_ENDED.labels(model, state, rule).set(count)
    if trial is None:
        return
    metrics.CANARY_RUNNING_SECONDS.labels(model, trial.version).set((now - trial.started_at).total_seconds())
    numbers = trial.decision or {}
    for side, version in (("canary", trial.version), ("production", trial.production_version)):
        counts = numbers.get(side) or {}
        metrics.CANARY_EVENTS.labels(model, side, version).set(counts.get("effective_events", 0))
        if counts.get("negative_share") is not None:
            metrics.CANARY_NEGATIVE_SHARE.labels(model, side, version).set(counts["negative_share"])
    if "prob_worse" in numbers:
        metrics.CANARY_PROB_WORSE.labels(model, trial.version).set(numbers["prob_worse"])


async def run_judge(
    settings: Settings, db: Database, stop: asyncio.Event, interval_s: float = JUDGE_INTERVAL_S
) -> None:
    """Judge and refresh the gauges every ``interval_s`` until ``stop`` is set; failures are logged and retried."""
    signer, lines = release_signer(settings), Lines(settings)
    while not stop.is_set():
        try:
            trials = [model for model in await rollouts.running_lines(db) if lines.matches(model)]
            for model in trials:  # each line's trial with its line's rollout settings
                await judge_once(lines.for_line(model), db, signer)
            await refresh_gauges(db, *lines.names(), *trials)
        except Exception as exc:
            log.warning("canary judge: %s: %s", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
