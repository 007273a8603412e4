"""The fleet as serving nodes report it (``adapter.status`` records, :class:`NodeStatus`), in PostgreSQL.

The engine's status consumer writes each record here (:func:`record_status`); the rollout reads which nodes
follow a line (:func:`live_nodes`), the API and the metrics read the whole view (:func:`nodes`). A node is
live while its last heartbeat is younger than ``rollout.node_timeout_s``; an older one is silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from streamengine.contract.events import NodeStatus
from streamengine.store.db import Database

# Compacted topics replay old records on a restart: a record older than the one stored changes nothing.
_UPSERT = """
INSERT INTO fleet_nodes
    (model, node_id, version, stage, state, target_version, reason, swapped_at, heartbeat_at, canary)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (model, node_id) DO UPDATE SET
    version = EXCLUDED.version, stage = EXCLUDED.stage, state = EXCLUDED.state, canary = EXCLUDED.canary,
    target_version = EXCLUDED.target_version, reason = EXCLUDED.reason, swapped_at = EXCLUDED.swapped_at,
    heartbeat_at = EXCLUDED.heartbeat_at, received_at = now()
WHERE fleet_nodes.heartbeat_at <= EXCLUDED.heartbeat_at
"""


@dataclass(frozen=True, slots=True)
class FleetNode:
    """One node of one model line as last reported; ``silent``: no heartbeat within the timeout."""

    model: str
    node_id: str
    version: str | None
    stage: str
    state: str
    target_version: str | None
    reason: str | None
    swapped_at: datetime | None
    heartbeat_at: datetime
    silent: bool
    canary: bool = True
    """Takes part in canaries (``serving.canary``)."""


async def record_status(db: Database, status: NodeStatus) -> None:
    """Store one node's report (an older one than stored is ignored)."""
    await db.execute(
        _UPSERT,
        status.model,
        status.node_id,
        status.version,
        status.stage,
        str(status.state),
        status.target_version,
        status.reason,
        status.swapped_at,
        status.heartbeat_at,
        status.canary,
    )


async def forget(db: Database, model: str, node_id: str) -> None:
    """Remove a node that left the fleet (a tombstone on its ``adapter.status`` key)."""
    await db.execute("DELETE FROM fleet_nodes WHERE model = $1 AND node_id = $2", model, node_id)


async def nodes(db: Database, timeout_s: float, model: str | None = None) -> list[FleetNode]:
    """Every reported node (of ``model``, or of every line), silent ones flagged, by line and node id."""
    rows = await db.fetch(
        "SELECT *, heartbeat_at < now() - make_interval(secs => $1) AS silent FROM fleet_nodes"
        " WHERE $2::text IS NULL OR model = $2 ORDER BY model, node_id",
        timeout_s,
        model,
    )
    return [FleetNode(**{name: row[name] for name in FleetNode.__slots__}) for row in rows]


async def live_nodes(db: Database, model: str, timeout_s: float) -> list[str]:
    """Ids of the nodes of ``model`` heard from within ``timeout_s`` that take part in canaries (what a canary
    is chosen among: a node with ``serving.canary`` off would never run it)."""
    return [node.node_id for node in await nodes(db, timeout_s, model) if not node.silent and node.canary]
