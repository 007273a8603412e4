"""The serving-node side: follow ``adapter.released`` and hot-swap each new adapter of one model line.

On start the subscriber bootstraps: it reads every partition of the topic from the beginning to its
end and applies the latest release of its model (the highest registry ``sequence``, else the last by
offset), so a node that starts late catches up. Then it follows the topic live. A release is applied
only after its signature (when the node holds a key: ``signing_key`` or ``serving.public_key_file``),
its freshness and every file's sha256 and size check out; any failure is logged on one line and
counted, and the adapter being served stays in place. Failures that may pass (S3 or the inference
server unreachable, a download past its deadline) are tried again with backoff until they succeed or a
newer release arrives; a tampered, oversized, missing or wrongly signed release is refused for good.
A node never steps back: a record whose ``event_id`` was seen before (an at-least-once redelivery) is
ignored, and one whose signed ``sequence`` is older than the one served (a replay) is refused, before
and after a restart. After each swap ``<download_dir>/<model>/current.json`` names the version being
served and its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from streamengine.config.keys import release_verifier
from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased
from streamengine.core.backoff import Backoff
from streamengine.core.manifest import serving_files
from streamengine.core.versions import Version
from streamengine.errors import ConfigError, IntegrityError, ServiceUnavailable
from streamengine.files import scratch_path, write_text_atomic
from streamengine.serving import follow
from streamengine.serving.metrics import CURRENT, IGNORED, RETRIES, STAGE_SECONDS, SWAP_FAILURES, SWAP_SECONDS, SWAPS
from streamengine.serving.swappers import Swapper
from streamengine.store.folders import DownloadLimits
from streamengine.store.objects import ObjectStore

log = logging.getLogger(__name__)

Status = Literal["swapped", "failed", "ignored"]
_SEEN_MAX = 4096
_CURRENT = "current.json"
_CURRENT_TMP = scratch_path(Path(_CURRENT)).name
# A download's temporary folder (".v1.2.k3j9x", see ObjectStore.download_uri) or a folder being replaced.
_PARTIAL = re.compile(r"^\.v\d+\.\d+\..+")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one release record (``stages``: seconds of consume, download, verify, swap)."""

    version: str | None
    status: Status
    reason: str
    detail: str = ""
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


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
        fetch_wait_ms: int = 100,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        reconcile_s: float = 30.0,
        on_swap: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.swapper = swapper
        self.model = model_name or settings.model.name
        self.topic = settings.kafka.released_topic
        self.download_dir = Path(settings.serving.download_dir) / self.model
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.poll_ms = poll_ms
        self.fetch_wait_ms = fetch_wait_ms
        self.retry_backoff, self.reconcile_s = Backoff(retry_initial_s, retry_max_s), reconcile_s
        self.on_swap = on_swap
        self.outcomes: deque[Outcome] = deque(maxlen=256)
        self.ready = asyncio.Event()
        self._store = store
        self._verifier = release_verifier(settings)
        self._served: tuple[AdapterReleased, dict[str, Any] | None] | None = None
        self._floor: tuple[int, str] | None = None  # (sequence, version) served: nothing older is taken
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._applying = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending: tuple[AdapterReleased, dict[str, Any] | None] | None = None
        self._retry_at = 0.0
        self._failures = 0
        """Tries in a row of the pending release that failed on a transient error."""

    @property
    def current(self) -> str | None:
        return self.swapper.current

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            timeout_s = min(60.0, self.settings.serving.download_timeout_s)  # no wait longer than a download
            self._store = ObjectStore.from_settings(self.settings.storage, read_timeout_s=timeout_s)
        return self._store

    # --- one release ---------------------------------------------------------------------------
    async def apply(
        self, event: AdapterReleased, raw: dict[str, Any] | None = None, produced_at: float | None = None
    ) -> Outcome:
        """Verify, download and swap in one release (``raw``: the record's JSON, for the signature;
        ``produced_at``: the record's timestamp in epoch seconds, to time the consume stage)."""
        async with self._applying:
            return await self._apply(event, raw, produced_at)

    async def _apply(self, event: AdapterReleased, raw: dict[str, Any] | None, produced_at: float | None) -> Outcome:
        if event.model != self.model:
            return await self._record(Outcome(event.version, "ignored", "other_model"))
        if event.version == self.swapper.current:
            self._pending = None
            return await self._record(Outcome(event.version, "ignored", "duplicate"))
        stages: dict[str, float] = {}
        if produced_at is not None:
            stages["consume"] = max(0.0, time.time() - produced_at)
        started = time.perf_counter()
        stage, previous = "signature", self.swapper.current
        try:
            self._check_signature(event, raw)
            stage = "stale"
            self._check_newer(event)
            stage = "too_large"
            limits = self._limits(event)
            stages["verify"] = time.perf_counter() - started
            stage = "download"
            folder = await self._download(event, limits, stages)
            stage, began = "swap", time.perf_counter()
            await self.swapper.swap(event.model, event.version, folder)
            stages["swap"] = time.perf_counter() - began
        except Exception as exc:
            return await self._refused(event, raw, stage, exc, stages)
        self._pending, self._failures = None, 0
        self._served = (event, raw)
        if event.sequence is not None:
            self._floor = (event.sequence, event.version)
        seconds = time.perf_counter() - started
        SWAP_SECONDS.labels(self.model).observe(seconds)
        for name, value in stages.items():
            STAGE_SECONDS.labels(self.model, name).observe(value)
        CURRENT.labels(self.model).info({"version": event.version})
        log.info("now serving adapter %s %s (%.0f ms from record)", self.model, event.version, seconds * 1000)
        await asyncio.to_thread(self._after_swap, event, previous)
        await self._call_on_swap(event.version)
        return await self._record(Outcome(event.version, "swapped", event.reason, seconds=seconds, stages=stages))

    async def _refused(
        self, event: AdapterReleased, raw: dict[str, Any] | None, stage: str, exc: Exception, stages: dict[str, float]
    ) -> Outcome:
        reason = stage if stage != "download" else "integrity" if isinstance(exc, IntegrityError) else "storage"
        transient = isinstance(exc, ServiceUnavailable)
        if transient:
            self._retry_later(event, raw)
        log.error(
            "refused adapter %s %s (%s): %s; still serving %s%s",
            self.model, event.version, reason, exc, self.swapper.current or "the base model",
            f"; trying again in {self._retry_at - time.monotonic():.1f}s" if transient else "",
        )  # fmt: skip
        return await self._record(Outcome(event.version, "failed", reason, str(exc), stages=stages))

    async def _call_on_swap(self, version: str) -> None:
        if self.on_swap is None:
            return
        try:
            result = self.on_swap(version)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_swap hook failed after swapping in %s", version)

    def _check_signature(self, event: AdapterReleased, raw: dict[str, Any] | None) -> None:
        """IntegrityError unless the record is signed as this node requires (checked on the JSON as received,
        which holds any field newer than this code, and on the parsed event when there is no such JSON)."""
        if not self._verifier.configured:
            return
        problems = [
            self._verifier.problem(c) for c in ([raw] if raw is not None else []) + [event.model_dump(mode="json")]
        ]
        if all(problems):
            raise IntegrityError(f"release {event.version} {problems[0]}")

    def _check_newer(self, event: AdapterReleased) -> None:
        """IntegrityError for a record older than the one served, by the registry's signed ``sequence``: an
        old record sent again (any ``event_id``) must not move the node back. A deploy or rollback the
        registry issued carries a newer sequence and passes."""
        if self._floor is None:
            return
        sequence, version = self._floor
        if event.sequence is None:
            raise IntegrityError(
                f"release {event.version} carries no sequence and this node serves {version} (sequence {sequence}):"
                " an old record sent again?"
            )
        if event.sequence < sequence or (event.sequence == sequence and event.version != version):
            raise IntegrityError(
                f"release {event.version} has sequence {event.sequence}, not newer than {version} (sequence"
                f" {sequence}) served: an old record sent again?"
            )

    def _limits(self, event: AdapterReleased) -> DownloadLimits:
        """The sizes the release declares and this node's bounds; IntegrityError when the files it declares
        exceed ``serving.max_adapter_bytes`` (refused before a byte is fetched)."""
        serving = self.settings.serving
        sizes = event.file_sizes or {}
        declared = sum(sizes.get(name, 0) for name in serving_files(event.files))
        if declared > serving.max_adapter_bytes:
            raise IntegrityError(
                f"release {event.version} declares {declared} bytes to download, over serving.max_adapter_bytes"
                f" ({serving.max_adapter_bytes})"
            )
        return DownloadLimits(sizes, event.size_bytes, serving.max_adapter_bytes, serving.download_timeout_s)

    async def _download(self, event: AdapterReleased, limits: DownloadLimits, stages: dict[str, float]) -> Path:
        """The release's verified folder (hashing time counts as verify, the rest as download)."""
        stats, began = {"hash_s": 0.0}, time.perf_counter()
        files = serving_files(event.files)
        folder = await self.store.adownload_uri(event.uri, self.download_dir / event.version, files, stats, limits)
        stages["download"] = time.perf_counter() - began - stats["hash_s"]
        stages["verify"] = stages.get("verify", 0.0) + stats["hash_s"]
        return folder

    def _retry_later(self, event: AdapterReleased, raw: dict[str, Any] | None) -> None:
        self._pending = (event, raw)
        self._failures += 1
        self._retry_at = time.monotonic() + self.retry_backoff.delay(self._failures)

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

    def _after_swap(self, event: AdapterReleased, previous: str | None) -> None:
        """Write current.json; drop downloaded folders other than the current and previous versions."""
        served = getattr(self.swapper, "served_name", None)
        version = event.version
        state = {
            "model": self.model,
            "version": version,
            "sequence": event.sequence,
            "previous": previous,
            "folder": str((self.download_dir / version).absolute()),
            "served_name": served(version) if callable(served) else None,
            "swapped_at": datetime.now(UTC).isoformat(),
        }
        write_text_atomic(self.download_dir / _CURRENT, json.dumps(state, indent=2) + "\n")
        for path in self.download_dir.iterdir():
            with contextlib.suppress(ConfigError):
                if path.is_dir() and Version.parse(path.name) and path.name not in (version, previous):
                    shutil.rmtree(path, ignore_errors=True)

    def _served_before(self) -> tuple[int, str] | None:
        """(sequence, version) that ``current.json`` says this node served before a restart: the bootstrap
        takes nothing older, even when compaction left only a replayed record in the topic."""
        try:
            state = json.loads((self.download_dir / _CURRENT).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        sequence, version = state.get("sequence"), state.get("version")
        return (sequence, version) if isinstance(sequence, int) and isinstance(version, str) else None

    def _remove_leftovers(self) -> None:
        """Remove what a killed subscriber left half-done: download folders (``.v1.2.<random>``), folders
        being replaced (``.v1.2.old-...``) and ``.current.json.tmp``. Complete version folders stay (each
        is verified again before use). One subscriber owns a ``download_dir``/model folder."""
        if not self.download_dir.is_dir():
            return
        removed = []
        for path in self.download_dir.iterdir():
            if path.name == _CURRENT_TMP or _PARTIAL.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            log.info("removed %d leftovers of an interrupted download: %s", len(removed), ", ".join(sorted(removed)))

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

    async def _apply_latest(self, records: list[Any], live: bool) -> None:
        """Apply the newest valid, never-seen release among ``records``; older ones are superseded.

        Newest is by the registry's ``sequence``, then by offset (the order compaction keeps), never by the
        producer's timestamp. A newest record with a bad signature (forged) does not hide an older good one.
        """
        fresh = await self._fresh(records)
        if not fresh:
            async with self._changed:
                self._changed.notify_all()
            return
        self._pending, self._failures = None, 0  # a newer release replaces a pending one
        while fresh:
            record, event, raw = fresh.pop()
            outcome = await self.apply(event, raw, record.timestamp / 1000 if live else None)
            if (outcome.status, outcome.reason) != ("failed", "signature"):
                break
        for _, event, _raw in fresh:
            await self._record(Outcome(event.version, "ignored", "superseded"))

    async def _fresh(self, records: list[Any]) -> list[tuple[Any, AdapterReleased, dict[str, Any]]]:
        """The decoded records whose ``event_id`` was not seen before, oldest first (see :meth:`_apply_latest`)."""
        decoded = [(r, *d) for r in records if (d := self._decode(r)) is not None]
        decoded.sort(key=lambda item: (item[1].sequence or 0, item[0].partition, item[0].offset))
        fresh = []
        for record, event, raw in decoded:
            if event.event_id in self._seen:
                await self._record(Outcome(event.version, "ignored", "redelivered"))
                continue
            self._seen[event.event_id] = None
            while len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            fresh.append((record, event, raw))
        return fresh

    # --- Kafka ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and bootstrap to the latest release of the model (sets ``ready``)."""
        if not self._verifier.configured:
            log.warning(
                "accepting UNSIGNED releases of %s: whoever can write to %s can make this node serve any adapter;"
                " set serving.public_key_file (or signing_key) and serving.require_signature: true",
                self.model, self.topic,
            )  # fmt: skip
        await asyncio.to_thread(self._remove_leftovers)
        self._floor = await asyncio.to_thread(self._served_before)
        consumer = await follow.open_consumer(
            self.settings.kafka, f"streamengine-subscriber-{self.model}", self.fetch_wait_ms
        )
        self._consumer = consumer
        started = time.perf_counter()
        records = await follow.read_to_end(
            consumer, self.topic, self.model.encode(), self.bootstrap_timeout_s, self._stopping
        )
        if records is None:
            log.warning("topic %s does not exist yet: serving %s until a release", self.topic, self.current)
        else:
            took = time.perf_counter() - started
            log.info("bootstrap read %d records of %s in %.2fs", len(records), self.model, took)
            await self._apply_latest(records, live=False)
        self.ready.set()

    async def run(self) -> None:
        """Start (unless started) and follow the topic until :meth:`stop`."""
        refreshed = reconciled = time.monotonic()
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
                        await follow.refresh_assignment(consumer, self.topic)
                        assigned = bool(consumer.assignment())
                    if not assigned:
                        await _sleep_or(self._stopping, 0.5)
                    else:
                        batch = await consumer.getmany(timeout_ms=self.poll_ms)
                        records = [r for tp in sorted(batch) for r in batch[tp]]
                        if records:
                            await self._apply_latest(records, live=True)
                except KafkaError as exc:
                    log.warning("reading %s failed: %s; retrying", self.topic, exc)
                    await _sleep_or(self._stopping, 1.0)
                if self._pending is not None and time.monotonic() >= self._retry_at:
                    RETRIES.labels(self.model).inc()
                    await self.apply(*self._pending)
                if time.monotonic() - reconciled > self.reconcile_s:
                    reconciled = time.monotonic()
                    await self._reconcile()
        finally:
            await self._close()

    async def _reconcile(self) -> None:
        """Let a swapper that can (HTTP) check the server still holds the current version, and when it lost
        it, load it again from its folder verified anew: signature, then every file's sha256 (a changed
        folder is downloaded again first)."""
        lost, reload = getattr(self.swapper, "lost", None), getattr(self.swapper, "reconcile", None)
        if lost is None or reload is None or self._served is None or self._served[0].version != self.current:
            return
        event, raw = self._served
        async with self._applying:
            try:
                if not await lost():
                    return
                self._check_signature(event, raw)
                folder = await self._download(event, self._limits(event), {})
                await reload(folder)
            except Exception as exc:
                log.warning("reloading the served adapter %s failed: %s", event.version, exc)

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
