-- The fleet as the serving nodes report it on adapter.status (store/fleet.py): one row per model line and
-- node, the latest record wins (a record older than the stored heartbeat is ignored).
CREATE TABLE fleet_nodes (
    model text NOT NULL,
    node_id text NOT NULL,
    version text,
    stage text NOT NULL CHECK (stage IN ('production', 'canary')),
    state text NOT NULL CHECK (state IN ('downloading', 'serving', 'failed')),
    target_version text,
    reason text,
    swapped_at timestamptz,
    heartbeat_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, node_id)
);
