-- streamengine schema v1: samples, windows, jobs, adapter registry, aliases, transactional outbox.

CREATE TABLE model_lines (
    model        text PRIMARY KEY,
    last_tick_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE windows (
    id            bigserial PRIMARY KEY,
    model         text NOT NULL REFERENCES model_lines (model),
    state         text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    samples       integer NOT NULL DEFAULT 0,          -- trainable samples
    weight        double precision NOT NULL DEFAULT 0, -- their summed weight
    stored        integer NOT NULL DEFAULT 0,          -- all samples, trainable or not
    first_offsets jsonb NOT NULL DEFAULT '{}'::jsonb,  -- partition -> first offset seen
    last_offsets  jsonb NOT NULL DEFAULT '{}'::jsonb,  -- partition -> last offset seen
    opened_at     timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    close_reason  text
);
-- At most one open window per model line: the row every ingest replica locks.
CREATE UNIQUE INDEX windows_one_open ON windows (model) WHERE state = 'open';

CREATE TABLE samples (
    event_id        text PRIMARY KEY,
    model           text NOT NULL,
    window_id       bigint NOT NULL REFERENCES windows (id),
    kind            text NOT NULL,
    prompt          jsonb NOT NULL,
    completion      text NOT NULL,
    weight          double precision NOT NULL,
    label           smallint NOT NULL,
    user_id         text,
    session_id      text,
    adapter_version text,
    event_time      timestamptz,
    source_partition integer,
    source_offset   bigint,
    stored_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX samples_window ON samples (window_id);
CREATE INDEX samples_user ON samples (user_id) WHERE user_id IS NOT NULL;

CREATE TABLE jobs (
    id               bigserial PRIMARY KEY,
    model            text NOT NULL REFERENCES model_lines (model),
    window_id        bigint NOT NULL UNIQUE REFERENCES windows (id),  -- one job per window
    reason           text NOT NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'released', 'rejected', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    version          text,            -- reserved before upload, kept across retries
    parent_version   text,
    progress         jsonb NOT NULL DEFAULT '{}'::jsonb,
    metrics          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX jobs_claimable ON jobs (id) WHERE state IN ('queued', 'running');

CREATE TABLE adapters (
    model          text NOT NULL REFERENCES model_lines (model),
    version        text NOT NULL,
    major          integer NOT NULL,
    minor          integer NOT NULL,
    parent_version text,
    job_id         bigint UNIQUE REFERENCES jobs (id),
    uri            text NOT NULL,
    size_bytes     bigint NOT NULL,
    manifest       jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

CREATE TABLE aliases (
    model      text NOT NULL REFERENCES model_lines (model),
    alias      text NOT NULL,
    version    text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES adapters (model, version)
);

CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        text NOT NULL,
    value      jsonb NOT NULL,
    headers    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz,
    attempts   integer NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
