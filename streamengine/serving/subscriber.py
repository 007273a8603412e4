"""The serving-node side: follow ``adapter.released`` and hot-swap each new adapter of one model line.

On start the subscriber bootstraps: it assigns every partition of the topic, reads it from the
beginning up to the highwater of each partition (taken from fetch responses, not ListOffsets, which
some Kafka-protocol brokers answer wrongly) and applies the latest release of its model. Then it
follows the topic live. A release is applied only after its signature (when a signing key is
configured) and every file's sha256 check out; any failure is logged on one line and counted, and
the adapter being served stays in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram, Info
from pydantic import ValidationError

from streamengine.config import Settings
from streamengine.core.manifest import signature_valid
from streamengine.core.versions import Version
from streamengine.errors import ConfigError, IntegrityError, ServiceUnavailable
from streamengine.events import AdapterReleased
from streamengine.serving.swappers import Swapper
from streamengine.store.objects import ObjectStore

log = logging.getLogger(__name__)

# Defined once per process (module level), so several Subscribers never register twice.
SWAPS = Counter("streamengine_subscriber_swaps", "Adapter versions swapped in.", ["model"])
SWAP_FAILURES = Counter(
    "streamengine_subscriber_swap_failures",
    "Releases refused or failed (the current adapter kept serving).",
    ["model", "reason"],
)
IGNORED = Counter(
    "streamengine_subscriber_releases_ignored",
    "Releases not applied on purpose (already serving that version, superseded in the same batch).",
    ["model", "reason"],
)
SWAP_SECONDS = Histogram(
    "streamengine_subscriber_swap_seconds",
    "From release record to serving: download, verification and adapter load.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CURRENT = Info("streamengine_subscriber_current_version", "The adapter version being served.", ["model"])

Status = Literal["swapped", "failed", "ignored"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one release record."""

    version: str | None
    status: Status
    reason: str
    detail: str = ""
    seconds: float = 0.0


class Subscriber:
    """Keeps ``swapper`` on the latest released adapter of ``model_name``."""

    def __init__(
        self,
        settings: Settings,
        swapper: Swapper,
        model_name: str | None = None,
        *,
        store: ObjectStore | None = None,
        bootstrap_timeout_s: float = 60.0,
        poll_ms: int = 500,
        on_swap: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.swapper = swapper
        self.model = model_name or settings.model.name
        self.topic = settings.kafka.released_topic
        self.download_dir = Path(settings.serving.download_dir) / self.model
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.poll_ms = poll_ms
        self.on_swap = on_swap
        self.outcomes: deque[Outcome] = deque(maxlen=256)
        self.ready = asyncio.Event()
        self._store = store
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._applying = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> str | None:
        return self.swapper.current

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore.from_settings(self.settings.storage)
        return self._store

    # --- one release ---------------------------------------------------------------------------
    async def apply(self, event: AdapterReleased, raw: dict[str, Any] | None = None) -> Outcome:
        """Verify, download and swap in one release (``raw``: the record's JSON, for the signature)."""
        async with self._applying:
            return await self._apply(event, raw)

    async def _apply(self, event: AdapterReleased, raw: dict[str, Any] | None) -> Outcome:
        if event.model != self.model:
            return await self._record(Outcome(event.version, "ignored", "other_model"))
        if event.version == self.swapper.current:
            return await self._record(Outcome(event.version, "ignored", "duplicate"))
        started = time.perf_counter()
        stage = "signature"
        previous = self.swapper.current
        try:
            self._check_signature(event, raw)
            stage = "download"
            dest = self.download_dir / event.version
            folder = await self.store.adownload_uri(event.uri, dest, event.files)
            stage = "swap"
            await self.swapper.swap(event.model, event.version, folder)
        except Exception as exc:
            reason = stage
            if stage == "download":
                reason = "integrity" if isinstance(exc, IntegrityError) else "storage"
            log.error(
                "refused adapter %s %s (%s): %s; still serving %s",
                self.model, event.version, reason, exc, self.swapper.current or "the base model",
            )  # fmt: skip
            return await self._record(Outcome(event.version, "failed", reason, str(exc)))
        seconds = time.perf_counter() - started
        SWAP_SECONDS.labels(self.model).observe(seconds)
        CURRENT.labels(self.model).info({"version": event.version})
        log.info("now serving adapter %s %s (%.0f ms from record)", self.model, event.version, seconds * 1000)
        self._prune({event.version, previous})
        if self.on_swap is not None:
            try:
                result = self.on_swap(event.version)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_swap hook failed after swapping in %s", event.version)
        return await self._record(Outcome(event.version, "swapped", event.reason, seconds=seconds))

    def _check_signature(self, event: AdapterReleased, raw: dict[str, Any] | None) -> None:
        if self.settings.signing_key is None:
            return
        if not event.signature:
            raise IntegrityError(f"release {event.version} is unsigned and a signing key is configured")
        key = self.settings.signing_key.get_secret_value()
        candidates = ([raw] if raw is not None else []) + [event.model_dump(mode="json")]
        if not any(signature_valid(c, key) for c in candidates):
            raise IntegrityError(f"release {event.version} has a wrong signature")

    async def _record(self, outcome: Outcome) -> Outcome:
        if outcome.status == "swapped":
            SWAPS.labels(self.model).inc()
        elif outcome.status == "failed":
            SWAP_FAILURES.labels(self.model, outcome.reason).inc()
        else:
            IGNORED.labels(self.model, outcome.reason).inc()
        self.outcomes.append(outcome)
        async with self._changed:
            self._changed.notify_all()
        return outcome

    def _prune(self, keep: set[str | None]) -> None:
        """Downloaded folders of versions other than the current and previous ones go."""
        if not self.download_dir.is_dir():
            return
        for path in self.download_dir.iterdir():
            try:
                Version.parse(path.name)
            except ConfigError:
                continue
            if path.name not in keep and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # --- waiting (tests, health) ---------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], within_s: float = 30.0) -> None:
        """Return once ``predicate()`` holds (checked after every record); TimeoutError after ``within_s``."""
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_for_version(self, version: str, within_s: float = 30.0) -> None:
        await self.wait_until(lambda: self.swapper.current == version, within_s)

    # --- records -------------------------------------------------------------------------------
    def _decode(self, record: Any) -> tuple[AdapterReleased, dict[str, Any]] | None:
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        if key is not None and key != self.model:
            return None  # another model line's release
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            raw = json.loads(record.value)
            if not isinstance(raw, dict):
                raise ValueError("value is not a JSON object")
            event = AdapterReleased.model_validate(raw)
        except (ValueError, TypeError, ValidationError) as exc:
            log.error("skipping bad release record %s: %s", where, str(exc).splitlines()[0][:300])
            self._bad(where, str(exc))
            return None
        if event.model != self.model:
            if key is not None:
                log.error("skipping release record %s: key %s but model %s", where, key, event.model)
                self._bad(where, "key and model differ")
            return None
        return event, raw

    def _bad(self, where: str, detail: str) -> None:
        SWAP_FAILURES.labels(self.model, "bad_record").inc()
        self.outcomes.append(Outcome(None, "failed", "bad_record", f"{where}: {detail[:300]}"))

    async def _apply_latest(self, records: list[Any]) -> None:
        """Apply the newest valid release among ``records``; older ones are superseded."""
        decoded = [(r.timestamp, r.offset, d) for r in records if (d := self._decode(r)) is not None]
        if not decoded:
            async with self._changed:
                self._changed.notify_all()
            return
        decoded.sort(key=lambda item: (item[0], item[1]))
        for _, _, (event, _raw) in decoded[:-1]:
            await self._record(Outcome(event.version, "ignored", "superseded"))
        event, raw = decoded[-1][2]
        await self.apply(event, raw)

    # --- Kafka ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and bootstrap to the latest release of the model (sets ``ready``)."""
        bootstrap = self.settings.kafka.bootstrap_servers
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"streamengine-subscriber-{self.model}",
            fetch_max_wait_ms=200,
        )
        try:
            await consumer.start()
        except (KafkaError, OSError) as exc:
            await consumer.stop()
            raise ServiceUnavailable("Kafka", bootstrap, str(exc) or type(exc).__name__) from None
        self._consumer = consumer
        await self._bootstrap(consumer)
        self.ready.set()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        try:
            cluster = await consumer._client.fetch_all_metadata()
        except KafkaError as exc:
            log.warning("cannot read metadata of topic %s: %s", self.topic, exc)
            return set(consumer.assignment())
        ids = cluster.partitions_for_topic(self.topic) or set()
        return {TopicPartition(self.topic, p) for p in ids}

    async def _bootstrap(self, consumer: AIOKafkaConsumer) -> None:
        started = time.perf_counter()
        parts = await self._partitions(consumer)
        if not parts:
            log.warning("topic %s does not exist yet: serving %s until a release", self.topic, self.current)
            return
        consumer.assign(list(parts))
        await consumer.seek_to_beginning(*parts)
        seen: list[Any] = []
        deadline = time.monotonic() + self.bootstrap_timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                seen.extend(r for r in records if r.key is None or r.key == self.model.encode())
            if await self._caught_up(consumer, parts):
                break
            if self._stopping.is_set():
                return
            if time.monotonic() > deadline:
                log.warning("bootstrap of %s not caught up after %.0fs; going on", self.topic, self.bootstrap_timeout_s)
                break
        log.info("bootstrap read %d records of %s in %.2fs", len(seen), self.model, time.perf_counter() - started)
        await self._apply_latest(seen)

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, parts: set[TopicPartition]) -> bool:
        for tp in parts:
            highwater = consumer.highwater(tp)
            if highwater is None or await consumer.position(tp) < highwater:
                return False
        return True

    async def _refresh_assignment(self, consumer: AIOKafkaConsumer) -> None:
        """Pick up the topic once it exists, and partitions added later (read from their start)."""
        current = set(consumer.assignment())
        parts = await self._partitions(consumer)
        new = parts - current
        if not new:
            return
        positions = {tp: await consumer.position(tp) for tp in current}
        consumer.assign(list(parts | current))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        await consumer.seek_to_beginning(*new)
        log.info("following %d new partitions of %s", len(new), self.topic)

    async def run(self) -> None:
        """Start (unless started) and follow the topic until :meth:`stop`."""
        refreshed = time.monotonic()
        try:
            if self._consumer is None:
                await self.start()
            consumer = self._consumer
            assert consumer is not None
            while not self._stopping.is_set():
                assigned = bool(consumer.assignment())
                try:
                    if time.monotonic() - refreshed > (10.0 if assigned else 1.0):
                        refreshed = time.monotonic()
                        await self._refresh_assignment(consumer)
                        assigned = bool(consumer.assignment())
                    if not assigned:
                        await _sleep_or(self._stopping, 0.5)
                        continue
                    batch = await consumer.getmany(timeout_ms=self.poll_ms)
                except KafkaError as exc:
                    log.warning("reading %s failed: %s; retrying", self.topic, exc)
                    await _sleep_or(self._stopping, 1.0)
                    continue
                records = [r for tp in sorted(batch) for r in batch[tp]]
                if records:
                    await self._apply_latest(records)
        finally:
            await self._close()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await asyncio.gather(task, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> Subscriber:
        """Run in the background; returns once bootstrapped (raises if starting failed)."""
        self._task = asyncio.create_task(self.run(), name=f"subscriber-{self.model}")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.is_set():
            ready.cancel()
            task, self._task = self._task, None
            await task  # raises what stopped it
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
