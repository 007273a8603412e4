"""The serving-node side: follow ``adapter.released`` (and ``adapter.canary``) and hot-swap each new adapter of
one model line.

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

Canaries (``serving.canary``, default on): the node also follows ``adapter.canary``. It keeps the latest
accepted record of each topic (a *lane*: ``production`` for releases, ``canary``), each checked as above
and each with its own sequence floor, so neither lane ever steps back. Which one it runs is decided by
the newer of the two (the registry numbers both from one counter): a canary record with stage
``canary`` that names this node (``serving.node_id``) runs its version; one that ended with ``promoted``
runs its version as production; anything else (a canary ended by a rollback or an abort, one naming
other nodes, a release newer than the canary) runs the latest release. So the return to production after
a rollback is taken although that release's sequence is older than the canary's (the ended record is
newer), while a replayed old canary record is refused by the canary lane's floor. ``current.json`` keeps
both floors across restarts. A node with ``serving.canary`` false never reads ``adapter.canary``.

The node reports what it runs on ``adapter.status`` (:mod:`streamengine.serving.status`): downloading,
serving, or failed with the reason and the version it could not load.
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
from streamengine.contract.events import AdapterCanary, AdapterReleased, NodeState
from streamengine.core.backoff import Backoff
from streamengine.core.manifest import serving_files
from streamengine.core.versions import Version
from streamengine.errors import ConfigError, IntegrityError, ServiceUnavailable
from streamengine.files import scratch_path, write_text_atomic
from streamengine.serving import follow
from streamengine.serving.metrics import CURRENT, IGNORED, RETRIES, STAGE_SECONDS, SWAP_FAILURES, SWAP_SECONDS, SWAPS
from streamengine.serving.status import Stage, StatusReporter
from streamengine.serving.swappers import Swapper
from streamengine.store.folders import DownloadLimits
from streamengine.store.objects import ObjectStore

log = logging.getLogger(__name__)

Status = Literal["swapped", "failed", "ignored"]
Lane = Literal["production", "canary"]
_LANES: tuple[Lane, ...] = ("production", "canary")
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


@dataclass(frozen=True, slots=True)
class _Accepted:
    """The latest accepted record of one lane (``arrival``: the order records were accepted in)."""

    event: AdapterReleased
    raw: dict[str, Any] | None
    arrival: int

    @property
    def lane(self) -> Lane:
        return _lane(self.event)


def _lane(event: AdapterReleased) -> Lane:
    return "canary" if isinstance(event, AdapterCanary) else "production"


def _newer(a: _Accepted, b: _Accepted) -> bool:
    """``a`` was issued after ``b``: by the registry's sequence when both carry one, else by arrival."""
    if a.event.sequence is not None and b.event.sequence is not None:
        return a.event.sequence > b.event.sequence
    return a.arrival > b.arrival


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
        self.node = settings.serving.node
        self.canary = settings.serving.canary
        self.topics = [self.topic] + ([settings.kafka.canary_topic] if self.canary else [])
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
        self.reporter = StatusReporter(settings, self.model)
        self._served: tuple[AdapterReleased, dict[str, Any] | None] | None = None
        self._lanes: dict[Lane, _Accepted] = {}
        self._floors: dict[Lane, tuple[int, str]] = {}  # (sequence, version) per lane: nothing older is taken
        self._arrivals = 0
        self._reporting: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._applying = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending = False
        """The target failed on a transient error: try it again at ``_retry_at``."""
        self._retry_at = 0.0
        self._failures = 0
        """Tries in a row of the target that failed on a transient error."""
        self._tried: str | None = None

    @property
    def current(self) -> str | None:
        return self.swapper.current

    @property
    def stage(self) -> Stage:
        """``canary`` while this node runs a canary version, else ``production``."""
        return self.reporter.view.stage

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            timeout_s = min(60.0, self.settings.serving.download_timeout_s)  # no wait longer than a download
            self._store = ObjectStore.from_settings(self.settings.storage, read_timeout_s=timeout_s)
        return self._store

    # --- one record ------------------------------------------------------------------------------
    async def apply(
        self, event: AdapterReleased, raw: dict[str, Any] | None = None, produced_at: float | None = None
    ) -> Outcome:
        """Check one release or canary record and run what it makes the target (``raw``: the record's JSON,
        for the signature; ``produced_at``: the record's timestamp in epoch seconds, to time the consume
        stage). Returns what became of it."""
        async with self._applying:
            accepted = await self._admit(event, raw)
            if isinstance(accepted, Outcome):
                return accepted
            outcome = await self._settle([accepted], produced_at)
            assert outcome is not None  # one accepted record: one outcome
            return outcome

    async def _admit(self, event: AdapterReleased, raw: dict[str, Any] | None) -> _Accepted | Outcome:
        """Take ``event`` as the latest of its lane when it is this line's, signed as required and not older
        than the lane's floor; else the outcome that says why not."""
        lane = _lane(event)
        if event.model != self.model:
            return await self._record(Outcome(event.version, "ignored", "other_model"))
        if lane == "canary" and not self.canary:
            return await self._record(Outcome(event.version, "ignored", "canary_off"))
        stage = "signature"
        try:
            self._check_signature(event, raw)
            stage = "stale"
            self._check_newer(event, lane)
        except IntegrityError as exc:
            return await self._refused(event, stage, exc, {}, None)
        self._arrivals += 1
        accepted = _Accepted(event, raw, self._arrivals)
        self._lanes[lane] = accepted
        if event.sequence is not None:
            self._floors[lane] = (event.sequence, event.version)
        return accepted

    def _target(self) -> tuple[_Accepted, Stage] | None:
        """The record this node should run and its stage (see the module's doc), None before any."""
        release, canary = self._lanes.get("production"), self._lanes.get("canary")
        if canary is not None and (release is None or _newer(canary, release)):
            event = canary.event
            assert isinstance(event, AdapterCanary)
            if event.stage == "canary" and self.node in event.canary_nodes:
                return canary, "canary"
            if event.stage == "ended" and event.outcome == "promoted":
                return canary, "production"
        return (release, "production") if release is not None else None

    def _passed_over(self, accepted: _Accepted) -> str:
        """Why an accepted record is not what the node runs."""
        event = accepted.event
        if isinstance(event, AdapterCanary):
            if event.stage == "ended":
                return "canary_ended"
            return "superseded" if self.node in event.canary_nodes else "not_named"
        return "on_canary"

    async def _settle(self, accepted: list[_Accepted], produced_at: float | None) -> Outcome | None:
        """Run the target (one outcome), or, when it is already served, record each accepted record as ignored."""
        target = self._target()
        if target is not None and target[0].event.version != self.swapper.current:
            return await self._swap(target[0], target[1], produced_at)
        self._pending, self._failures = False, 0
        self.reporter.update(
            stage=target[1] if target else "production", state=NodeState.SERVING, target_version=None, reason=None
        )
        if accepted:
            await asyncio.to_thread(self._save_floors)
        outcome = None
        for item in accepted:
            why = "duplicate" if target is not None and item is target[0] else self._passed_over(item)
            outcome = await self._record(Outcome(item.event.version, "ignored", why))
        return outcome

    async def _swap(self, target: _Accepted, stage: Stage, produced_at: float | None) -> Outcome:
        """Verify, download and swap in the target's version."""
        event, raw = target.event, target.raw
        if event.version != self._tried:
            self._tried, self._failures = event.version, 0
        stages: dict[str, float] = {}
        if produced_at is not None:
            stages["consume"] = max(0.0, time.time() - produced_at)
        self.reporter.update(stage=stage, state=NodeState.DOWNLOADING, target_version=event.version, reason=None)
        started = time.perf_counter()
        step, previous = "too_large", self.swapper.current
        try:
            limits = self._limits(event)
            stages["verify"] = time.perf_counter() - started
            step = "download"
            folder = await self._download(event, limits, stages)
            step, began = "swap", time.perf_counter()
            await self.swapper.swap(event.model, event.version, folder)
            stages["swap"] = time.perf_counter() - began
        except Exception as exc:
            return await self._refused(event, step, exc, stages, stage)
        self._pending, self._failures = False, 0
        self._served = (event, raw)
        seconds = time.perf_counter() - started
        SWAP_SECONDS.labels(self.model).observe(seconds)
        for name, value in stages.items():
            STAGE_SECONDS.labels(self.model, name).observe(value)
        CURRENT.labels(self.model).info({"version": event.version})
        log.info(
            "now serving adapter %s %s (%s, %.0f ms from record)", self.model, event.version, stage, seconds * 1000
        )
        swapped_at = datetime.now(UTC)
        await asyncio.to_thread(self._after_swap, event, previous, stage, swapped_at)
        self.reporter.update(
            version=event.version, stage=stage, state=NodeState.SERVING, target_version=None, reason=None,
            swapped_at=swapped_at,
        )  # fmt: skip
        await self._call_on_swap(event.version)
        reason = "canary" if stage == "canary" else getattr(event, "outcome", None) or event.reason
        return await self._record(Outcome(event.version, "swapped", reason, seconds=seconds, stages=stages))

    async def _refused(
        self, event: AdapterReleased, step: str, exc: Exception, stages: dict[str, float], stage: Stage | None
    ) -> Outcome:
        """Log and count a refused record (``stage`` None) or a target that failed to load (its stage)."""
        reason = step if step != "download" else "integrity" if isinstance(exc, IntegrityError) else "storage"
        transient = stage is not None and isinstance(exc, ServiceUnavailable)
        if transient:
            self._pending, self._failures = True, self._failures + 1
            self._retry_at = time.monotonic() + self.retry_backoff.delay(self._failures)
        if stage is not None:  # a load that failed: the fleet view shows it (a canary's counts against it)
            state = NodeState.DOWNLOADING if transient else NodeState.FAILED
            why = f"{reason}: {exc}" if not transient else f"retrying after {reason}: {exc}"
            self.reporter.update(stage=stage, state=state, target_version=event.version, reason=why)
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

    def _check_newer(self, event: AdapterReleased, lane: Lane) -> None:
        """IntegrityError for a record older than the latest its lane took, by the registry's signed
        ``sequence``: an old record sent again (any ``event_id``) must not move the node back. A deploy,
        rollback or canary decision the registry issued carries a newer sequence and passes."""
        floor = self._floors.get(lane)
        if floor is None:
            return
        sequence, version = floor
        what = "canary record" if lane == "canary" else "release"
        if event.sequence is None:
            raise IntegrityError(
                f"{what} {event.version} carries no sequence and this node took {version} (sequence {sequence}):"
                " an old record sent again?"
            )
        if event.sequence < sequence or (event.sequence == sequence and event.version != version):
            raise IntegrityError(
                f"{what} {event.version} has sequence {event.sequence}, not newer than {version} (sequence"
                f" {sequence}) taken: an old record sent again?"
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

    def _after_swap(self, event: AdapterReleased, previous: str | None, stage: Stage, swapped_at: datetime) -> None:
        """Write current.json; drop downloaded folders other than the current and previous versions."""
        served = getattr(self.swapper, "served_name", None)
        version = event.version
        state = {
            "model": self.model,
            "version": version,
            "sequence": event.sequence,
            "stage": stage,
            "previous": previous,
            "folder": str((self.download_dir / version).absolute()),
            "served_name": served(version) if callable(served) else None,
            "swapped_at": swapped_at.isoformat(),
            "floors": {lane: list(floor) for lane, floor in self._floors.items()},
        }
        write_text_atomic(self.download_dir / _CURRENT, json.dumps(state, indent=2) + "\n")
        for path in self.download_dir.iterdir():
            with contextlib.suppress(ConfigError):
                if path.is_dir() and Version.parse(path.name) and path.name not in (version, previous):
                    shutil.rmtree(path, ignore_errors=True)

    def _save_floors(self) -> None:
        """Keep the lanes' floors in ``current.json`` when they moved without a swap (nothing before a swap)."""
        path = self.download_dir / _CURRENT
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        floors = {lane: list(floor) for lane, floor in self._floors.items()}
        if isinstance(state, dict) and (state.get("floors"), state.get("stage")) != (floors, self.stage):
            write_text_atomic(path, json.dumps({**state, "floors": floors, "stage": self.stage}, indent=2) + "\n")

    def _served_before(self) -> dict[Lane, tuple[int, str]]:
        """The lanes' floors ``current.json`` kept before a restart (an older file: the served release's
        sequence): the bootstrap takes nothing older, even when compaction left only a replayed record."""
        try:
            state = json.loads((self.download_dir / _CURRENT).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(state, dict):
            return {}
        saved = state.get("floors")
        if not isinstance(saved, dict):
            saved = {"production": [state.get("sequence"), state.get("version")]}
        floors: dict[Lane, tuple[int, str]] = {}
        for lane in _LANES:
            value = saved.get(lane)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], int) and isinstance(value[1], str):
                floors[lane] = (value[0], value[1])
        return floors

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
        kind = AdapterReleased if record.topic == self.topic else AdapterCanary
        try:
            raw = json.loads(record.value)
            if not isinstance(raw, dict):
                raise ValueError("value is not a JSON object")
            event = kind.model_validate(raw)
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
        """Accept the newest valid, never-seen record of each lane among ``records`` (older ones are
        superseded), then run the target.

        Newest is by the registry's ``sequence``, then by offset (the order compaction keeps), never by the
        producer's timestamp. A newest record with a bad signature (forged) does not hide an older good one.
        """
        fresh = await self._fresh(records)
        if not fresh:
            async with self._changed:
                self._changed.notify_all()
            return
        async with self._applying:
            accepted, produced_at = [], None
            for lane in _LANES:
                items = [item for item in fresh if _lane(item[1]) == lane]
                while items:
                    record, event, raw = items.pop()
                    result = await self._admit(event, raw)
                    if isinstance(result, _Accepted):
                        accepted.append(result)
                        if live:
                            produced_at = max(produced_at or 0.0, record.timestamp / 1000)
                        break
                    if (result.status, result.reason) != ("failed", "signature"):
                        break
                for _, event, _raw in items:
                    await self._record(Outcome(event.version, "ignored", "superseded"))
            await self._settle(accepted, produced_at)

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
        self._floors = await asyncio.to_thread(self._served_before)
        consumer = await follow.open_consumer(
            self.settings.kafka, f"streamengine-subscriber-{self.model}", self.fetch_wait_ms
        )
        self._consumer = consumer
        started = time.perf_counter()
        records = await follow.read_to_end(
            consumer, self.topics, self.model.encode(), self.bootstrap_timeout_s, self._stopping
        )
        if records is None:
            log.warning("topic %s does not exist yet: serving %s until a release", self.topic, self.current)
        else:
            took = time.perf_counter() - started
            log.info("bootstrap read %d records of %s in %.2fs", len(records), self.model, took)
            await self._apply_latest(records, live=False)
        self._reporting = asyncio.create_task(self.reporter.run(self._stopping), name=f"status-{self.model}")
        log.info(
            "node %s follows %s (canaries %s), serving %s (%s)", self.node, ", ".join(self.topics),
            "on" if self.canary else "off", self.current or "the base model", self.stage,
        )  # fmt: skip
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
                        await follow.refresh_assignment(consumer, self.topics)
                        assigned = bool(consumer.assignment())
                    if not assigned:
                        await follow.sleep_or(self._stopping, 0.5)
                    else:
                        batch = await consumer.getmany(timeout_ms=self.poll_ms)
                        records = [r for tp in sorted(batch) for r in batch[tp]]
                        if records:
                            await self._apply_latest(records, live=True)
                except KafkaError as exc:
                    log.warning("reading %s failed: %s; retrying", ", ".join(self.topics), exc)
                    await follow.sleep_or(self._stopping, 1.0)
                if self._pending and time.monotonic() >= self._retry_at:
                    RETRIES.labels(self.model).inc()
                    async with self._applying:
                        await self._settle([], None)
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
        reporting, self._reporting = self._reporting, None
        if reporting is not None:
            self._stopping.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reporting, 5.0)

    async def __aenter__(self) -> Subscriber:
        """Run in the background; returns once bootstrapped (raises if starting failed)."""
        self._task = await follow.start_until_ready(self.run(), self.ready, f"subscriber-{self.model}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
