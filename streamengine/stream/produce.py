"""`streamengine produce`: validate a JSONL file of feedback events and send it to Kafka."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from streamengine.config.settings import Settings
from streamengine.contract import cloudevents
from streamengine.contract.events import FEEDBACK_TYPE, decode_feedback
from streamengine.errors import EventRejected
from streamengine.stream.producer import start_producer

KafkaRecord = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
"""key, value, headers"""


@dataclass
class Prepared:
    records: list[KafkaRecord] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)


def prepare(lines: Iterable[bytes], max_bytes: int, keep_invalid: bool) -> Prepared:
    """Validate each non-blank line; valid events get the contract's key and CloudEvents headers."""
    prepared = Prepared()
    for line_no, raw in enumerate(lines, start=1):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            event = decode_feedback(raw, max_bytes)
        except EventRejected as exc:
            prepared.invalid.append((line_no, f"{exc.error_class}: {exc}"))
            if keep_invalid:
                prepared.records.append((None, raw, []))
            continue
        key = event.user_id or event.session_id
        headers = cloudevents.as_kafka(cloudevents.headers(event.event_id, FEEDBACK_TYPE, event.timestamp))
        prepared.records.append((key.encode() if key else None, raw, headers))
    return prepared


async def send(settings: Settings, topic: str, records: list[KafkaRecord]) -> int:
    """Send records and wait for every acknowledgement; returns how many were sent."""
    if not records:
        return 0
    producer = await start_producer(settings.kafka)
    try:
        futures = [await producer.send(topic, value=v, key=k, headers=h) for k, v, h in records]
        for future in futures:
            await future
    finally:
        await producer.stop()
    return len(futures)
