"""CloudEvents binary-mode Kafka headers (ce_specversion, ce_id, ce_type, ce_source, ce_time)."""

from __future__ import annotations

from datetime import UTC, datetime

SOURCE = "streamengine"


def headers(event_id: str, event_type: str, time: datetime | None = None) -> dict[str, str]:
    moment = (time or datetime.now(UTC)).astimezone(UTC)
    return {
        "ce_specversion": "1.0",
        "ce_id": event_id,
        "ce_type": event_type,
        "ce_source": SOURCE,
        "ce_time": moment.isoformat().replace("+00:00", "Z"),
        "content-type": "application/json",
    }


def as_kafka(values: dict[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in values.items()]
