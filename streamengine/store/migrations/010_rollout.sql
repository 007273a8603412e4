-- Canary releases (store/rollouts.py): how far each version got, the trials, and the live outcome counts
-- that judge them.
ALTER TABLE adapters ADD COLUMN stage text NOT NULL DEFAULT 'production'
    CHECK (stage IN ('canary', 'production', 'rolled_back'));

-- One row per canary: running until a decision (or an operator) ends it, then the decision with its numbers.
CREATE TABLE rollouts (
    id bigserial PRIMARY KEY,
    model text NOT NULL REFERENCES model_lines (model),
    version text NOT NULL,
    production_version text NOT NULL,
    canary_nodes text[] NOT NULL,
    canary_topic text NOT NULL,
    state text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'promoted', 'rolled_back', 'aborted')),
    started_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    decision jsonb,
    UNIQUE (model, version)
);
CREATE UNIQUE INDEX rollouts_one_running ON rollouts (model) WHERE state = 'running';

-- Outcomes of the feedback naming a version (adapter_version), counted by ingest in the batch's transaction:
-- while a trial runs, those of its canary and production versions per contributor (SHA-256 of the user, else
-- session; '' for none) under its id (rollout_id), so production's side counts only what came during the
-- trial; those naming a version that was no live release of the line when they arrived (known false: unknown,
-- another line's) by version alone under rollout_id 0, never judged.
CREATE TABLE rollout_outcomes (
    model text NOT NULL,
    version text NOT NULL,
    rollout_id bigint NOT NULL,
    known boolean NOT NULL,
    contributor text NOT NULL,
    positive bigint NOT NULL DEFAULT 0,
    negative bigint NOT NULL DEFAULT 0,
    neutral bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (model, rollout_id, version, known, contributor)
);
