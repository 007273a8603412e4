"""`streamengine produce`: validate a JSONL file of feedback events and send it to Kafka."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from streamengine.config.settings import Settings
from streamengine.contract.events import decode_feedback
from streamengine.errors import EventRejected, Undelivered
from streamengine.stream.sender import Record, RecordSender, feedback_record


@dataclass
class Prepared:
    records: list[Record] = field(default_factory=list)
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
                prepared.records.append(Record(None, raw, []))
            continue
        prepared.records.append(feedback_record(event, raw))
    return prepared


async def send(settings: Settings, topic: str, records: list[Record], timeout_s: float = 30.0) -> int:
    """Send records and wait for every acknowledgement, at most ``timeout_s`` (then :class:`Undelivered`);
    returns how many were sent."""
    if not records:
        return 0
    sender = RecordSender(settings.kafka, topic)
    await sender.start()
    futures = []
    try:
        for record in records:
            futures.append(await sender.send(record))
    finally:
        await sender.close(timeout_s)  # settles every future
    failed = [record for future, record in zip(futures, records, strict=True) if future.exception() is not None]
    if failed:
        first = next(f.exception() for f in futures if f.exception() is not None)
        raise Undelivered(f"{len(failed)} of {len(records)} records not sent to {topic}: {first}", failed)
    return len(records)
