"""Prometheus metrics of the engine and the worker (prefix ``streamengine_``, base units).

No per-user labels: label values come from small fixed sets (reason, state, model line).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("streamengine_events_consumed_total", "Feedback records consumed.")
EVENTS_REJECTED = Counter(
    "streamengine_events_rejected_total", "Feedback records sent to the DLQ, by reason.", ["reason"]
)
EVENTS_DEDUPLICATED = Counter(
    "streamengine_events_deduplicated_total", "Valid events dropped because their event_id was already stored."
)
SAMPLES_STORED = Counter("streamengine_samples_stored_total", "Samples written to PostgreSQL.", ["model"])
BATCH_WRITE_SECONDS = Histogram(
    "streamengine_batch_write_seconds",
    "Time to store one ingest batch in PostgreSQL.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGEST_RETRIES = Counter("streamengine_ingest_retries_total", "Batch writes retried after a failure.")
WINDOW_SAMPLES = Gauge("streamengine_window_samples", "Trainable samples in the open window.", ["model"])
WINDOW_WEIGHT = Gauge("streamengine_window_weight", "Summed weight of the open window.", ["model"])
WINDOWS_CLOSED = Counter("streamengine_windows_closed_total", "Windows closed, by reason.", ["model", "reason"])
JOBS = Gauge("streamengine_jobs", "Training jobs by state.", ["state"])
TRAINING_SECONDS = Histogram(
    "streamengine_training_seconds",
    "Wall time of one training run.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
)
TRAINING_TOKENS_PER_SECOND = Gauge("streamengine_training_tokens_per_second", "Throughput of the last run.")
TRAINING_LOSS = Gauge("streamengine_training_loss", "Task loss of the last training step.", ["model"])
EVAL_LOSS = Gauge("streamengine_eval_loss", "Loss on the window before/after training.", ["model", "phase"])
RELEASES = Counter("streamengine_releases_total", "Adapter versions released, by reason.", ["model", "reason"])
JOB_FAILURES = Counter("streamengine_job_failures_total", "Training jobs that failed an attempt.", ["model"])
UPLOAD_BYTES = Counter("streamengine_upload_bytes_total", "Bytes uploaded to object storage.")
UPLOAD_SECONDS = Histogram("streamengine_upload_seconds", "Time to upload and verify one adapter folder.")
OUTBOX_BACKLOG = Gauge("streamengine_outbox_backlog", "Outbox rows not yet published.")
OUTBOX_PUBLISHED = Counter("streamengine_outbox_published_total", "Outbox rows published to Kafka.")
OUTBOX_FAILURES = Counter("streamengine_outbox_failures_total", "Failed attempts to publish outbox rows.")
WEIGHT_CAPPED = Counter(
    "streamengine_weight_capped_total", "Sample weight removed by the per-user share cap (learning.max_user_share)."
)
SAMPLES_DOWNWEIGHTED = Counter(
    "streamengine_samples_downweighted_total", "Samples whose weight the per-user share cap reduced."
)
REJECTIONS = Counter("streamengine_rejections_total", "Candidates the release gate refused.", ["model"])
FORGETTING = Gauge("streamengine_forgetting_ratio", "Relative rise of retention/anchor loss of the last candidate.", ["model"])
