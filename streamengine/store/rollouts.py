"""Canary rollouts in PostgreSQL: the live outcome counts, the trials, and their decisions applied exactly once.

Ingest counts the outcome of every new event naming a version (:func:`count_outcomes`, one statement in the
batch's transaction, whatever the lines). The engine judges each running trial (:func:`judge`) with the pure rule of
:mod:`streamengine.core.rollout`; an operator can decide by hand (:func:`decide_by_hand`) and a manual deploy
or rollback aborts it (:func:`abort_running`). Every decision takes the model line's lock, then the trial's row,
checks it is still running and, in the same transaction, moves the aliases, queues the records through the
outbox and stores the decision with its numbers: a crash leaves either all of it or none, and a second judge
finds the trial ended.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
import msgspec

from streamengine.contract.events import AdapterReleased
from streamengine.core.manifest import Signer
from streamengine.core.release import canary_record
from streamengine.core.rollout import (
    Action,
    Decision,
    Outcome,
    RolloutPolicy,
    SideCounts,
    UserTally,
    contributor,
    decide,
    side_counts,
)
from streamengine.core.samples import Sample
from streamengine.errors import Conflict
from streamengine.store.db import Database
from streamengine.store.fleet import FleetNode
from streamengine.store.job_queue import announce, enqueue_canary, move_production, next_sequence

Ending = Literal["promoted", "rolled_back", "aborted"]

_HASHED = "encode(sha256(convert_to({}, 'UTF8')), 'hex')"
"""SQL: how a contributor's id is stored (the cap only needs to tell contributors apart)."""

# The batch's outcomes by (model line, version, contributor) as one JSON parameter, every line of the batch in
# one statement. Kept: the outcomes of the line's running trial's two versions, by contributor, under the trial's
# id; and those naming a version that is no live release of the line, by version alone under trial 0 (counted
# apart, never judged). Feedback on other released versions, or with no trial running, judges nothing and is not
# kept. The statement looks up the trials and the versions itself; contributors are stored as SHA-256 hex, '' for
# none.
_COUNT = """
WITH t AS (
    SELECT t.*, EXISTS (
        SELECT 1 FROM adapters a WHERE a.model = t.model AND a.version = t.version AND a.deleted_at IS NULL
    ) AS known
    FROM json_to_recordset($1::json) AS t(model text, version text, contributor text, positive bigint,
        negative bigint, neutral bigint)
),
trial AS (
    SELECT model, id, version, production_version FROM rollouts
    WHERE model IN (SELECT model FROM t) AND state = 'running'
)
INSERT INTO rollout_outcomes AS o (model, version, rollout_id, known, contributor, positive, negative, neutral)
SELECT t.model, t.version, CASE WHEN t.known THEN (SELECT id FROM trial WHERE trial.model = t.model) ELSE 0 END,
    t.known, CASE WHEN t.known AND t.contributor IS NOT NULL THEN {hashed} ELSE '' END AS who,
    sum(t.positive), sum(t.negative), sum(t.neutral)
FROM t
WHERE NOT t.known OR t.version IN (
    SELECT version FROM trial WHERE trial.model = t.model
    UNION ALL SELECT production_version FROM trial WHERE trial.model = t.model
)
GROUP BY t.model, t.version, t.known, who
ON CONFLICT (model, rollout_id, version, known, contributor) DO UPDATE SET positive = o.positive + EXCLUDED.positive,
    negative = o.negative + EXCLUDED.negative, neutral = o.neutral + EXCLUDED.neutral
""".format(hashed=_HASHED.format("t.contributor"))

# One side's tallies for the cap: the ``$4`` heaviest contributors one by one, the rest and the anonymous summed as
# one anonymous tally (core.rollout.side_counts: the same counts as passing every contributor).
_SIDE = """
WITH t AS (
    SELECT contributor, sum(positive + negative + neutral) AS events, sum(negative) AS negatives
    FROM rollout_outcomes WHERE model = $1 AND rollout_id = $2 AND version = $3 AND known GROUP BY contributor
), ranked AS (
    SELECT *, row_number() OVER (ORDER BY events DESC, contributor) AS rank FROM t WHERE contributor <> ''
)
SELECT contributor AS user, events, negatives FROM ranked WHERE rank <= $4
UNION ALL
SELECT NULL, sum(events), sum(negatives) FROM (
    SELECT events, negatives FROM ranked WHERE rank > $4
    UNION ALL SELECT events, negatives FROM t WHERE contributor = ''
) rest HAVING count(*) > 0
"""


@dataclass(frozen=True, slots=True)
class Rollout:
    id: int
    model: str
    version: str
    production_version: str
    canary_nodes: list[str]
    canary_topic: str
    state: str
    started_at: datetime
    decided_at: datetime | None
    decision: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "production_version": self.production_version,
            "canary_nodes": self.canary_nodes,
            "state": self.state,
            "started_at": self.started_at.isoformat(),
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "decision": self.decision,
        }


def _rollout(row: asyncpg.Record) -> Rollout:
    return Rollout(**{name: row[name] for name in Rollout.__slots__})


_NO_OUTCOMES: dict[str, int] = dict.fromkeys(Outcome, 0)


def _tallies(samples: Sequence[Sample], outcomes: Sequence[Outcome | None]) -> list[dict[str, Any]]:
    """The outcomes of the samples naming a version, by (line, version, contributor), as ``_COUNT`` reads them."""
    counts = Counter(
        (sample.model, sample.adapter_version, contributor(sample.user_id, sample.session_id), result)
        for sample, result in zip(samples, outcomes, strict=True)
        if sample.adapter_version is not None and result is not None
    )
    rows: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for (model, version, who, result), n in counts.items():
        row = rows.get((model, version, who))
        if row is None:
            row = rows[model, version, who] = {"model": model, "version": version, "contributor": who, **_NO_OUTCOMES}
        row[result] += n
    return list(rows.values())


async def count_outcomes(
    conn: asyncpg.Connection, samples: Sequence[Sample], outcomes: Sequence[Outcome | None]
) -> None:
    """Count the outcomes of new events that name a version, of every line, in one statement (in the caller's
    transaction)."""
    if tallies := _tallies(samples, outcomes):
        await conn.execute(_COUNT, msgspec.json.encode(tallies).decode())  # in C: json.dumps costs ~1 us a row


async def forget(conn: asyncpg.Connection, user_id: str) -> None:
    """Drop the outcome counts of a forgotten user (``privacy.forget_user``, in its transaction)."""
    await conn.execute(f"DELETE FROM rollout_outcomes WHERE contributor = {_HASHED.format('$1')}", user_id)


async def _side(conn: asyncpg.Connection, rollout: Rollout, version: str, max_user_share: float) -> SideCounts:
    top = math.ceil(1 / max_user_share)
    rows = await conn.fetch(_SIDE, rollout.model, rollout.id, version, top)
    return side_counts((UserTally(r["user"], int(r["events"]), int(r["negatives"])) for r in rows), max_user_share)


async def unjudged_counts(db: Database, model: str) -> dict[str, int]:
    """Events naming a version that is no live release of ``model`` (unknown, another line's), by version named."""
    rows = await db.fetch(
        "SELECT version, sum(positive + negative + neutral) AS n FROM rollout_outcomes WHERE model = $1 AND NOT known"
        " GROUP BY version ORDER BY version",
        model,
    )
    return {r["version"]: int(r["n"]) for r in rows}


async def running_lines(db: Database) -> list[str]:
    """The model lines with a canary on trial."""
    rows = await db.fetch("SELECT DISTINCT model FROM rollouts WHERE state = 'running' ORDER BY model")
    return [r["model"] for r in rows]


async def running(db: Database, model: str) -> Rollout | None:
    """The trial of ``model`` still running, if any."""
    row = await db.fetchrow("SELECT * FROM rollouts WHERE model = $1 AND state = 'running'", model)
    return _rollout(row) if row else None


async def ended_counts(db: Database, model: str) -> dict[tuple[str, str], int]:
    """Trials of ``model`` that ended, by (state, rule that ended them)."""
    rows = await db.fetch(
        "SELECT state, coalesce(decision->>'rule', '') AS rule, count(*) AS n FROM rollouts"
        " WHERE model = $1 AND state <> 'running' GROUP BY 1, 2",
        model,
    )
    return {(r["state"], r["rule"]): r["n"] for r in rows}


async def of_version(db: Database, model: str, version: str) -> Rollout | None:
    """The trial of ``version`` (running or decided), if it had one."""
    row = await db.fetchrow("SELECT * FROM rollouts WHERE model = $1 AND version = $2", model, version)
    return _rollout(row) if row else None


async def _lock_running(conn: asyncpg.Connection, model: str) -> Rollout | None:
    """The line's running trial, its row locked (the caller holds the model line's lock already)."""
    row = await conn.fetchrow("SELECT * FROM rollouts WHERE model = $1 AND state = 'running' FOR UPDATE", model)
    return _rollout(row) if row else None


def _record(decision: Decision, by: str) -> dict[str, Any]:
    return {**asdict(decision), "by": by}


async def _assess(conn: asyncpg.Connection, rollout: Rollout, policy: RolloutPolicy, failed_nodes: int) -> Decision:
    canary = await _side(conn, rollout, rollout.version, policy.max_user_share)
    production = await _side(conn, rollout, rollout.production_version, policy.max_user_share)
    now: datetime = await conn.fetchval("SELECT now()")
    return decide(canary, production, failed_nodes=failed_nodes, started_at=rollout.started_at, now=now, policy=policy)


async def _end(
    conn: asyncpg.Connection,
    rollout: Rollout,
    ending: Ending,
    record: dict[str, Any],
    released_topic: str,
    signer: Signer | None,
) -> None:
    """End ``rollout`` (locked, running): aliases, stage, records through the outbox, the decision stored."""
    model, version = rollout.model, rollout.version
    await conn.execute("DELETE FROM aliases WHERE model = $1 AND alias = 'canary' AND version = $2", model, version)
    stored = AdapterReleased(
        event_id="-",
        **await conn.fetchval("SELECT manifest FROM adapters WHERE model = $1 AND version = $2", model, version),
    )
    production = rollout.production_version
    if ending == "promoted":  # announced on adapter.released with the reason it was released for (v1 reasons)
        await move_production(conn, model, version)
        await announce(conn, model, version, stored.reason, released_topic, signer)
        production = version
    stage = "production" if ending == "promoted" else "rolled_back"
    await conn.execute("UPDATE adapters SET stage = $3 WHERE model = $1 AND version = $2", model, version, stage)
    now: datetime = await conn.fetchval("SELECT now()")
    ended = canary_record(
        stored,
        stage="ended",
        nodes=rollout.canary_nodes,
        production=production,
        outcome=ending,
        now=now,
        signer=signer,
        sequence=await next_sequence(conn, model),
    )
    await enqueue_canary(conn, rollout.canary_topic, ended)
    await conn.execute(
        "UPDATE rollouts SET state = $2, decided_at = now(), decision = $3 WHERE id = $1", rollout.id, ending, record
    )


_ENDINGS: dict[Action, Ending] = {Action.PROMOTE: "promoted", Action.ROLLBACK: "rolled_back"}


def failed_nodes(rollout: Rollout, nodes: Sequence[FleetNode]) -> int:
    """Nodes of the canary that report they failed to load its version."""
    return sum(
        node.node_id in rollout.canary_nodes and node.state == "failed" and node.target_version == rollout.version
        for node in nodes
    )


async def judge(
    db: Database,
    model: str,
    policy: RolloutPolicy,
    nodes: Sequence[FleetNode],
    released_topic: str,
    signer: Signer | None,
) -> tuple[Rollout, Decision] | None:
    """Judge the running trial of ``model`` on its counts and the line's ``nodes`` (store.fleet) and apply the
    decision; None when none is running (any more). A wait stores the current numbers (``decision``, with
    ``decided_at`` still empty) for ``adapters info``."""
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM rollouts WHERE model = $1 AND state = 'running')", model):
        return None  # the common case, without taking the model line's lock
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        rollout = await _lock_running(conn, model)
        if rollout is None:
            return None
        decision = await _assess(conn, rollout, policy, failed_nodes(rollout, nodes))
        ending = _ENDINGS.get(decision.action)
        if ending is None:
            await conn.execute(
                "UPDATE rollouts SET decision = $2 WHERE id = $1", rollout.id, _record(decision, "engine")
            )
        else:
            await _end(conn, rollout, ending, _record(decision, "engine"), released_topic, signer)
        return rollout, decision


async def decide_by_hand(
    db: Database,
    model: str,
    action: Literal["promote", "abort"],
    policy: RolloutPolicy,
    released_topic: str,
    signer: Signer | None,
) -> Rollout:
    """An operator promotes or aborts the running trial of ``model`` (Conflict when none runs); the record
    keeps the numbers as they stood. Returns the trial as it ended."""
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM model_lines WHERE model = $1 FOR UPDATE", model)
        rollout = await _lock_running(conn, model)
        if rollout is None:
            raise Conflict(f"model '{model}' has no canary on trial")
        numbers = await _assess(conn, rollout, policy, failed_nodes=0)
        ending: Ending = "promoted" if action == "promote" else "aborted"
        record = {**_record(numbers, "operator"), "action": action, "rule": "manual", "reason": f"{action} by hand"}
        await _end(conn, rollout, ending, record, released_topic, signer)
        row = await conn.fetchrow("SELECT * FROM rollouts WHERE id = $1", rollout.id)
        return _rollout(row)


async def abort_running(
    conn: asyncpg.Connection, model: str, why: str, released_topic: str, signer: Signer | None
) -> None:
    """End the running trial of ``model``, if any, as aborted (a manual deploy or rollback; the caller holds the
    model line's lock in its transaction)."""
    rollout = await _lock_running(conn, model)
    if rollout is not None:
        record = {"action": "abort", "rule": "manual", "reason": why, "by": "operator"}
        await _end(conn, rollout, "aborted", record, released_topic, signer)
