"""Prometheus metrics of the engine and the worker (prefix ``streamengine_``, base units).

No per-user labels: label values come from small fixed sets (reason, state, phase, model line,
topic partition). Which process exposes what:

- ``streamengine run`` (admin API ``/metrics``): ingest, windows, jobs, scheduler, outbox, consumer
  lag, registry. Gauges read from PostgreSQL (windows, jobs, last release, ticks) are refreshed on
  every scrape, so every replica reports the same fleet-wide value: aggregate them with ``max``.
- ``streamengine worker`` (``metrics.port``): training, evaluation, upload, releases, rejections.
- ``streamengine subscribe`` (``metrics.port``): ``streamengine_subscriber_*``, defined in
  :mod:`streamengine.serving.subscriber`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- ingest (run) ----------------------------------------------------------------------------------
EVENTS_CONSUMED = Counter("streamengine_events_consumed_total", "Feedback records consumed.")
EVENTS_REJECTED = Counter(
    "streamengine_events_rejected_total", "Feedback records sent to the DLQ, by reason.", ["reason"]
)
EVENTS_DEDUPLICATED = Counter(
    "streamengine_events_deduplicated_total", "Valid events dropped because their event_id was already stored."
)
EVENTS_FORGOTTEN = Counter(
    "streamengine_events_forgotten_total",
    "Valid events of users forgotten after the event was made (POST /users/forget): dropped, not stored.",
)
SAMPLES_STORED = Counter("streamengine_samples_stored_total", "Samples written to PostgreSQL.", ["model"])
SAMPLES_TRUNCATED = Counter(
    "streamengine_samples_truncated_total",
    "Texts of valid events cut to samples.max_prompt_chars / max_completion_chars (samples.overlength: truncate),"
    " by field (prompt, completion).",
    ["field"],
)
BATCH_WRITE_SECONDS = Histogram(
    "streamengine_batch_write_seconds",
    "Time to store one ingest batch in PostgreSQL.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WEIGHT_CAPPED = Counter(
    "streamengine_weight_capped_total", "Sample weight removed by the per-user share cap (learning.max_user_share)."
)
SAMPLES_DOWNWEIGHTED = Counter(
    "streamengine_samples_downweighted_total", "Samples whose weight the per-user share cap reduced."
)
INGEST_BATCH_BYTES = Histogram(
    "streamengine_ingest_batch_bytes",
    "Bytes (keys, values, headers) of the records of one ingest batch: at most kafka.batch_max_bytes, or one record.",
    buckets=(2**16, 2**18, 2**20, 2**22, 2**24, 2**26, 2**28),
)
INGEST_RETRIES = Counter("streamengine_ingest_retries_total", "Batch writes retried after a failure.")
CONSUMER_LAG = Gauge(
    "streamengine_consumer_lag_records",
    "Records of an assigned partition not yet processed and committed: highwater minus committed offset"
    " (or minus the fetch position before the first commit). Reported by the replica the partition is assigned to.",
    ["topic", "partition"],
)

# --- windows and jobs (run; read from PostgreSQL) --------------------------------------------------
WINDOW_SAMPLES = Gauge("streamengine_window_samples", "Trainable samples in the open window.", ["model"])
WINDOW_WEIGHT = Gauge("streamengine_window_weight", "Summed weight of the open window.", ["model"])
WINDOWS_CLOSED = Counter(
    "streamengine_windows_closed_total",
    "Windows closed by this process, by reason (threshold, schedule, manual).",
    ["model", "reason"],
)
JOBS = Gauge("streamengine_jobs", "Training jobs by state (all model lines).", ["state"])
JOB_AGE = Gauge(
    "streamengine_jobs_oldest_age_seconds",
    "Age of the oldest queued job (since created) or running job (since started); 0 when none.",
    ["state"],
)
LAST_RELEASE = Gauge(
    "streamengine_last_release_timestamp_seconds", "Unix time of the newest adapter version in the registry.", ["model"]
)
TICKS = Counter(
    "streamengine_scheduler_ticks_total",
    "Cron ticks this process fired, by outcome (closed: a window closed; skipped: fewer than window.min_samples).",
    ["model", "outcome"],
)
LAST_TICK = Gauge("streamengine_scheduler_last_tick_timestamp_seconds", "Unix time of the last cron tick.", ["model"])
NEXT_TICK = Gauge("streamengine_scheduler_next_tick_timestamp_seconds", "Unix time of the next cron tick.", ["model"])

# --- privacy (run) ---------------------------------------------------------------------------------
REDACTIONS = Counter(
    "streamengine_redactions_total",
    "Findings replaced in feedback texts before storage, by kind (email, phone, card, a privacy.patterns name,"
    " or function: a text privacy.function changed).",
    ["kind"],
)
SAMPLES_EXPIRED = Counter(
    "streamengine_samples_expired_total", "Samples deleted by the retention loop (privacy.retention_days)."
)
SAMPLES_FORGOTTEN = Counter(
    "streamengine_samples_forgotten_total", "Samples deleted by forget requests (POST /users/forget)."
)
FORGET_REQUESTS = Counter("streamengine_forget_requests_total", "Forget requests served (POST /users/forget).")

# --- outbox relay (run) ----------------------------------------------------------------------------
OUTBOX_BACKLOG = Gauge("streamengine_outbox_backlog", "Outbox rows not yet published.")
OUTBOX_PUBLISHED = Counter("streamengine_outbox_published_total", "Outbox rows published to Kafka.")
OUTBOX_FAILURES = Counter("streamengine_outbox_failures_total", "Failed attempts to publish outbox rows.")

# --- fleet (run; adapter.status, read from PostgreSQL) --------------------------------------------------
FLEET_STATUS_RECORDS = Counter(
    "streamengine_fleet_status_records_total",
    "adapter.status records read, by outcome: stored, or invalid (not a NodeStatus of its key; skipped).",
    ["outcome"],
)
FLEET_NODES = Gauge(
    "streamengine_fleet_nodes",
    "Serving nodes heard from within rollout.node_timeout_s, by model line, version served (none: the base),"
    " stage (production, canary) and state (downloading, serving, failed).",
    ["model", "version", "stage", "state"],
)
FLEET_FAILED = Gauge(
    "streamengine_fleet_failed_nodes",
    "Serving nodes (not silent) whose last load failed, by model line and the version they could not load.",
    ["model", "target_version"],
)
FLEET_SILENT = Gauge(
    "streamengine_fleet_silent_nodes",
    "Serving nodes of a model line with no status for longer than rollout.node_timeout_s.",
    ["model"],
)

# --- canary judgement (run; read from PostgreSQL by the judge, every pass) -------------------------------
CANARY_TRIALS_ENDED = Gauge(
    "streamengine_canary_trials_ended",
    "Canary trials of a model line that ended, by state (promoted, rolled_back, aborted) and the rule that ended"
    " them (not_worse, regression, failed_nodes, timeout, manual).",
    ["model", "state", "rule"],
)
CANARY_RUNNING_SECONDS = Gauge(
    "streamengine_canary_running_seconds",
    "Age of the running canary trial of a model line, by the version on trial (absent: none runs).",
    ["model", "version"],
)
CANARY_EVENTS = Gauge(
    "streamengine_canary_events",
    "Feedback events of the running trial after the per-user cap, by side (canary, production) and version.",
    ["model", "side", "version"],
)
CANARY_NEGATIVE_SHARE = Gauge(
    "streamengine_canary_negative_share",
    "Share of negative outcomes of the running trial after the per-user cap, by side and version.",
    ["model", "side", "version"],
)
CANARY_PROB_WORSE = Gauge(
    "streamengine_canary_prob_worse",
    "Posterior probability that the canary is worse than production by more than rollout.max_regression.",
    ["model", "version"],
)

# --- training (worker) -----------------------------------------------------------------------------
TRAINING_SECONDS = Histogram(
    "streamengine_training_seconds",
    "Wall time of one training run.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
)
TRAINING_TOKENS_PER_SECOND = Gauge("streamengine_training_tokens_per_second", "Throughput of the last run.")
TRAINING_STEPS_PER_SECOND = Gauge("streamengine_training_steps_per_second", "Optimizer steps per second, last run.")
TRAINING_LOSS = Gauge("streamengine_training_loss", "Task loss of the last training step.", ["model"])
EWC_PENALTY = Gauge("streamengine_training_ewc_penalty", "EWC penalty of the last training step.", ["model"])
EVAL_LOSS = Gauge("streamengine_eval_loss", "Loss on the window before/after training.", ["model", "phase"])
FORGETTING = Gauge(
    "streamengine_forgetting_ratio", "Relative rise of retention/anchor loss of the last candidate.", ["model"]
)
RELEASES = Counter("streamengine_releases_total", "Adapter versions released, by reason.", ["model", "reason"])
REJECTIONS = Counter("streamengine_rejections_total", "Candidates the release gate refused.", ["model"])
JOB_FAILURES = Counter("streamengine_job_failures_total", "Training jobs that failed an attempt.", ["model"])
UPLOAD_BYTES = Counter("streamengine_upload_bytes_total", "Bytes uploaded to object storage.")
UPLOAD_SECONDS = Histogram("streamengine_upload_seconds", "Time to upload and verify one adapter folder.")

# --- trainer processes (worker) ----------------------------------------------------------------------
_STARTUP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TRAINER_START_SECONDS = Histogram(
    "streamengine_trainer_start_seconds",
    "Time a training job waited for a trainer ready to take it (a fresh process: its start and imports).",
    ["warm"],
    buckets=_STARTUP_BUCKETS,
)
TRAINER_BASE_LOAD_SECONDS = Histogram(
    "streamengine_trainer_base_load_seconds",
    "Time to load a base model in a trainer (every job of a fresh process; once per base in a warm one).",
    buckets=_STARTUP_BUCKETS,
)
TRAINER_JOBS = Counter(
    "streamengine_trainer_jobs_total",
    "Training jobs, by whether they ran warm (a trainer waiting with the base loaded).",
    ["warm"],
)
TRAINER_PHASE_SECONDS = Histogram(
    "streamengine_trainer_phase_seconds",
    "Time spent in each phase of a training job.",
    ["phase"],
    buckets=_STARTUP_BUCKETS,
)
TRAINER_RESTARTS = Counter(
    "streamengine_trainer_restarts_total",
    "Warm trainers replaced: job_limit, memory, failed (a job failed), ended (it exited or died).",
    ["reason"],
)
TRAINER_MEMORY = Gauge("streamengine_trainer_memory_bytes", "Resident memory of the warm trainer after its last job.")
