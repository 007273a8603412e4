"""Prometheus metrics of a serving node: its subscriber and its feedback producer (defined once per process,
labelled by model line).

Counters are exposed with the ``_total`` suffix (``streamengine_subscriber_swaps_total``...), the
histograms in seconds, the current version as an Info (``..._current_version_info{version="v1.3"} 1``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

SWAPS = Counter("streamengine_subscriber_swaps_total", "Adapter versions swapped in.", ["model"])
SWAP_FAILURES = Counter(
    "streamengine_subscriber_swap_failures_total",
    "Releases refused or failed, by reason (the current adapter kept serving).",
    ["model", "reason"],
)
IGNORED = Counter(
    "streamengine_subscriber_releases_ignored_total",
    "Releases not applied on purpose (already serving it, redelivered, superseded in the same batch).",
    ["model", "reason"],
)
RETRIES = Counter("streamengine_subscriber_retries_total", "Releases tried again after a transient failure.", ["model"])
SWAP_SECONDS = Histogram(
    "streamengine_subscriber_swap_seconds",
    "From handling a release record to serving it: download, verification and adapter load.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "streamengine_subscriber_stage_seconds",
    "Time per stage of applying a release: consume (record produced -> received), download, verify, swap.",
    ["model", "stage"],
    buckets=_LATENCY_BUCKETS,
)
CURRENT = Info("streamengine_subscriber_current_version", "The adapter version being served.", ["model"])

FEEDBACK_SENT = Counter("streamengine_producer_events_sent_total", "Feedback events acknowledged by Kafka.", ["model"])
FEEDBACK_FAILED = Counter(
    "streamengine_producer_events_failed_total",
    "Feedback events not sent, by reason: invalid (refused at the call), buffer_full (a non-blocking send with the "
    "buffer full), refused (by the broker), closed (not acknowledged when the producer closed).",
    ["model", "reason"],
)
FEEDBACK_BUFFERED = Gauge(
    "streamengine_producer_buffered_events", "Feedback events taken and not yet acknowledged by Kafka.", ["model"]
)

STATUS_SENT = Counter(
    "streamengine_subscriber_status_sent_total", "NodeStatus records (changes and heartbeats) Kafka took.", ["model"]
)
STATUS_FAILURES = Counter(
    "streamengine_subscriber_status_failures_total",
    "NodeStatus records not sent (broker away...; the next heartbeat repeats the state).",
    ["model"],
)
