"""The trainer worker: claim a job, train in a child process, upload, release.

Sequence for one job (each step safe to repeat after a crash):
claim (lease) -> samples from PostgreSQL -> parent adapter from S3 -> train (child process) -> reserve
the version -> manifest + upload + verify -> one transaction: registry row, aliases, outbox row, job
released. Heartbeats keep the lease (and carry progress and the phase) through all of it
(:mod:`streamengine.jobs.lease`). Training runs in the worker's warm trainer, a process kept between jobs
with the base model loaded (:mod:`streamengine.jobs.warm_trainer`), or with ``worker.warm`` false, with
``training.processes`` > 1, on a quantized base and for Fisher jobs, in a process of its own. An idle
worker is woken by a new job (PostgreSQL NOTIFY, :mod:`streamengine.store.notify`) and looks every
``worker.poll_s`` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from streamengine import metrics
from streamengine.config.keys import release_signer
from streamengine.config.lines import Lines
from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased, LoraSpec
from streamengine.core.backoff import Backoff
from streamengine.core.gate import GateDecision, GatePolicy, decide
from streamengine.core.job_states import JobState
from streamengine.core.manifest import sha256_bytes
from streamengine.core.release import build_release, manifest_of
from streamengine.core.rollout import canary_nodes
from streamengine.errors import Conflict, ServiceUnavailable, StreamEngineError, TrainingError, is_transient
from streamengine.jobs import anchors, dataset
from streamengine.jobs.lease import Lease, LeaseLost
from streamengine.jobs.trainer_process import ProgressHandler, Result, TrainingCrashed, run_training
from streamengine.jobs.warm_trainer import WarmTrainer, takes
from streamengine.store import fleet, job_queue, registry, windows
from streamengine.store.db import Database
from streamengine.store.folders import file_sha256
from streamengine.store.job_queue import FISHER_FILE
from streamengine.store.notify import JOBS, Wakeups
from streamengine.store.objects import ObjectStore
from streamengine.training.launch import fisher_command, training_command
from streamengine.training.spec import FisherResult, FisherSpec, Progress, TrainResult, TrainSpec
from streamengine.training.warm_protocol import Preload

log = logging.getLogger(__name__)

RECENT_LOSSES = 32  # step losses kept in a running job's progress

OUTAGE_BACKOFF_MAX_S = 30.0
"""Longest wait between two tries while a dependency (S3) is unreachable (from ``worker.poll_s``, doubling)."""


class Worker:
    def __init__(self, settings: Settings, db: Database, store: ObjectStore, owner: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.signer = release_signer(settings)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.work_dir = Path(settings.worker.work_dir)
        self.lines = Lines(settings)
        """Each job trains with its line's settings (``models:`` entries; config/lines.py)."""
        self.outages = 0
        """Jobs in a row that ended on an unreachable dependency: the next claim waits longer each time."""
        worker = settings.worker
        limit = worker.trainer_memory_limit_mb
        self.trainer = WarmTrainer(worker, self.work_dir / "trainer.log", limit) if worker.warm else None
        self.wakeups = Wakeups(db, JOBS)
        self._running = False  # run() keeps the warm trainer between jobs

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process jobs until ``stop`` is set; a job in progress then goes back to the queue."""
        log.info("worker %s waiting for jobs", self.owner)
        self._running = True
        model, training = self.settings.model, self.settings.training
        if self.trainer is not None and takes(training.processes, model.quantization):
            self.trainer.prewarm(
                Preload(base_model=model.base, device=training.device, quantization=model.quantization)
            )
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                current = asyncio.create_task(self._one_job())
                await asyncio.wait({current, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not current.done():
                    current.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await current
                    break
                try:
                    job = current.result()
                except Exception as exc:  # PostgreSQL away: wait and back off, never exit (a job in hand expires)
                    if not (isinstance(exc, StreamEngineError) or is_transient(exc)):
                        raise
                    self.outages += 1
                    log.warning("worker: %s (%s); retrying", exc, type(exc).__name__)
                    job = None
                poll_s = self.settings.worker.poll_s
                if self.outages:
                    with contextlib.suppress(TimeoutError):
                        wait_s = Backoff(2 * poll_s, OUTAGE_BACKOFF_MAX_S).delay(self.outages)
                        await asyncio.wait_for(asyncio.shield(stopping), timeout=wait_s)
                elif job is None:
                    await self.wakeups.wait(poll_s, stop)
        finally:
            stopping.cancel()
            self._running = False
            await self.close()

    async def close(self) -> None:
        """End the warm trainer and the LISTEN connection."""
        await self.wakeups.close()
        if self.trainer is not None:
            await self.trainer.close()

    async def run_once(self) -> job_queue.Job | None:
        """Claim one job and take it to its end state; None when the queue is empty. Outside :meth:`run`, the
        trainer it starts ends with it: a lone job leaves no process behind."""
        try:
            return await self._one_job()
        finally:
            if not self._running and self.trainer is not None:
                await self.trainer.close()

    async def _one_job(self) -> job_queue.Job | None:
        worker = self.settings.worker
        claimed_at = time.monotonic()
        job = await job_queue.claim(self.db, self.owner, worker.lease_s, worker.max_attempts)
        if job is None:
            self.outages = 0  # PostgreSQL answers and nothing waits
            return None
        log.info("job %d (%s, window %d, attempt %d) claimed", job.id, job.model, job.window_id, job.attempts)
        outages, self.outages = self.outages, 0
        lease = Lease(self.db, job.id, self.owner, worker, claimed_at)
        try:
            await lease.hold(self._process_fisher(job, lease) if job.kind == "fisher" else self._process(job, lease))
        except LeaseLost as exc:
            log.warning("job %d: %s", job.id, exc)
        except TrainingCrashed as exc:
            state = await self._finish(job, "failed", str(exc), retry=True)
            log.error("job %d: %s; job is now %s", job.id, exc, state)
        except TrainingError as exc:
            state = await self._finish(job, "failed", str(exc), retry=False)
            log.error("job %d failed: %s", job.id, exc)
        except ServiceUnavailable as exc:
            # S3 (or another dependency) is away: not the job's fault, so no attempt limit; the job waits in
            # the queue (keeping its place: later windows train on top of it) and the worker backs off.
            self.outages = outages + 1
            state = await self._finish(job, "failed", str(exc), retry=True, limited=False)
            log.error("job %d: %s; job is now %s, next try in a while", job.id, exc, state)
        except StreamEngineError as exc:
            state = await self._finish(job, "failed", str(exc), retry=True)
            log.error("job %d: %s; job is now %s", job.id, exc, state)
        except asyncio.CancelledError:
            await asyncio.shield(job_queue.give_back(self.db, job.id, self.owner))
            log.info("job %d given back to the queue: the worker is stopping", job.id)
            raise
        return job

    async def _finish(self, job: job_queue.Job, state: JobState, error: str, retry: bool, limited: bool = True) -> str:
        metrics.JOB_FAILURES.labels(job.model).inc()
        limit = self.settings.worker.max_attempts if limited else None
        try:
            return await job_queue.finish_unreleased(
                self.db, job.id, self.owner, state, error, retry=retry, max_attempts=limit
            )
        except Conflict:
            return "taken over"

    async def _process(self, job: job_queue.Job, lease: Lease) -> None:
        line = self.lines.for_line(job.model)
        folder = self.work_dir / f"job-{job.id}"
        await asyncio.to_thread(_fresh_dir, folder)
        objective = line.training.objective
        run_child = partial(self._run_child, job, lease)
        anchor_path = await anchors.job_anchor_set(line, self.db, self.store, folder, run_child)
        data = await dataset.prepare(
            self.db, line, job.id, job.model, job.window_id, folder, objective == "kto", anchor_path
        )
        log.info("job %d data: %s", job.id, ", ".join(f"{k} {v}" for k, v in data.counts.items()))
        # A new base model starts a new major line, trained from scratch (the old adapter fits the old base).
        new_base = await registry.base_model_changed(self.db, job.model, line.model.base)
        parent_dir, parent_fisher = (
            (None, None) if new_base else await self._fetch_parent(job.model, job.parent_version, folder)
        )
        output = folder / "adapter"
        spec = TrainSpec(
            base_model=line.model.base,
            parent_adapter=str(parent_dir) if parent_dir else None,
            parent_fisher=str(parent_fisher) if parent_fisher else None,
            samples_path=str(data.samples_path),
            eval_sets={name: str(path) for name, path in data.eval_sets.items()},
            output_dir=str(output),
            lora=line.lora,
            training=line.training,
            ewc=line.ewc,
            distill=line.learning.distill,
            base_sets=["anchor"],
            quantization=line.model.quantization,
            parent_average=line.learning.parent_average,
            orthogonal_weight=line.learning.orthogonal_weight,
            replay_keep=data.replay_keep,
            anchor_per_epoch=data.anchor_per_epoch,
        )
        spec_path = folder / "spec.json"
        await asyncio.to_thread(spec.write, spec_path)
        started = time.monotonic()
        result = await self._train(job, lease, spec, spec_path, folder / "train.log")
        record_training_metrics(job.model, result)
        if spec.replay_keep is not None:
            log.info("job %d replay by loss: kept %d of %d candidates (%.1f s)", job.id, result.replay_kept,
                     result.replay_candidates, result.replay_pick_seconds)  # fmt: skip
        metrics.TRAINING_SECONDS.observe(time.monotonic() - started)
        decision = decide(result.eval, gate_of(line))
        numbers = release_metrics(result, decision)
        if decision.forgetting is not None:
            metrics.FORGETTING.labels(job.model).set(decision.forgetting)
        if not decision.release:
            async with lease.last_step():
                await job_queue.finish_unreleased(self.db, job.id, self.owner, "rejected", decision.reason, numbers)
            metrics.REJECTIONS.labels(job.model).inc()
            log.warning("job %d rejected, nothing released: %s", job.id, decision.reason)
            await asyncio.to_thread(shutil.rmtree, folder, True)
            return
        version = await job_queue.reserve_version(self.db, job.id, self.owner, major=new_base)
        lease.phase("uploading")
        event = await self._upload(job, version, output, numbers)
        lease.phase("releasing")
        canary = await canary_for(line, self.db, job.model, version)
        async with lease.last_step():
            await job_queue.release(
                self.db, job.id, self.owner, event, self.settings.kafka.released_topic, self.signer, canary
            )
        metrics.RELEASES.labels(job.model, event.reason).inc()
        stage = f"canary on {', '.join(canary.nodes)}" if canary else "production"
        log.info("job %d released %s %s to %s (%s)", job.id, job.model, version, stage, decision.reason)
        await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _fetch_parent(self, model: str, version: str | None, folder: Path) -> tuple[Path | None, Path | None]:
        """The parent adapter's folder and its Fisher file (the registry's current one), when there is one."""
        if not version:
            return None, None
        adapter = await registry.get_adapter(self.db, model, version)
        files = {name: sha for name, sha in adapter.manifest["files"].items() if name != FISHER_FILE}
        parent = await self.store.adownload_uri(adapter.uri, folder / "parent", files)
        if not (adapter.fisher_file and adapter.fisher_sha256):
            return parent, None
        fisher = {adapter.fisher_file: adapter.fisher_sha256}
        fisher_dir = await self.store.adownload_uri(adapter.uri, folder / "parent-fisher", fisher)
        return parent, fisher_dir / adapter.fisher_file

    async def _process_fisher(self, job: job_queue.Job, lease: Lease) -> None:
        """Compute the Fisher of a released version on its window and add it to the version's folder.

        The file is named by the job and its content (``fisher-job<id>-<sha256[:16]>.safetensors``): a retry
        that finds its earlier attempt's object stored adds nothing, and one that computed other bytes (not
        every accelerator sums in the same order) stores a name of its own; stored objects stay immutable."""
        assert job.target_version is not None
        line = self.lines.for_line(job.model)
        folder = self.work_dir / f"job-{job.id}"
        await asyncio.to_thread(_fresh_dir, folder)
        adapter = await registry.get_adapter(self.db, job.model, job.target_version)
        data = await dataset.prepare(self.db, line, job.id, job.model, job.window_id, folder)
        files = {name: sha for name, sha in adapter.manifest["files"].items() if name != FISHER_FILE}
        adapter_dir = await self.store.adownload_uri(adapter.uri, folder / "adapter", files)
        _, parent_fisher = await self._fetch_parent(job.model, adapter.parent_version, folder)
        spec = FisherSpec(
            base_model=line.model.base,
            adapter_dir=str(adapter_dir),
            samples_path=str(data.samples_path),
            out_path=str(folder / "fisher.safetensors"),
            parent_fisher=str(parent_fisher) if parent_fisher else None,
            ewc=line.ewc,
            training=line.training,
            quantization=line.model.quantization,
        )
        spec_path = folder / "fisher.json"
        await asyncio.to_thread(spec.write, spec_path)
        lease.phase("fisher")
        result = await self._run_child(job, lease, fisher_command(spec_path), folder / "fisher.log", FisherResult)
        sha = await asyncio.to_thread(file_sha256, Path(result.path))
        name = f"fisher-job{job.id}-{sha[:16]}.safetensors"
        lease.phase("uploading")
        stored = await asyncio.to_thread(Path(result.path).rename, folder / name)
        await self.store.aadd_file(stored, job.model, adapter.version)
        async with lease.last_step():
            await job_queue.finish_fisher(self.db, job.id, self.owner, job.model, adapter.version, name, sha)
        log.info(
            "job %d: Fisher of %s %s stored as %s (%.1fs)", job.id, job.model, adapter.version, name, result.seconds
        )
        await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _train(
        self, job: job_queue.Job, lease: Lease, spec: TrainSpec, spec_path: Path, log_path: Path
    ) -> TrainResult:
        """Train in the warm trainer, or in a process of its own; the phases go into the lease and the metrics."""
        clock = PhaseClock(lease)
        on_progress = self._progress_handler(job, lease)
        processes = spec.training.processes
        if self.trainer is not None and takes(processes, spec.quantization):
            result, warm = await self.trainer.train(spec, log_path, on_progress, clock.enter)
        else:
            await clock.enter("waiting_for_trainer")
            limit = self.settings.worker.trainer_memory_limit_mb
            argv = training_command(spec_path, processes)
            result = await run_training(argv, log_path, TrainResult, on_progress, limit, on_phase=clock.enter)
            warm = False
        clock.finish(warm)
        log.info("job %d trained (%s trainer): %s", job.id, "warm" if warm else "fresh", clock.summary())
        return result

    async def _run_child(
        self, job: job_queue.Job, lease: Lease, argv: list[str], log_path: Path, result_type: type[Result]
    ) -> Result:
        """Run a Fisher child process; its phases and progress go into the lease's heartbeats and the metrics."""
        limit = self.settings.worker.trainer_memory_limit_mb
        clock = PhaseClock(lease)
        return await run_training(
            argv, log_path, result_type, self._progress_handler(job, lease), limit, on_phase=clock.enter
        )

    def _progress_handler(self, job: job_queue.Job, lease: Lease) -> ProgressHandler:
        """Training steps into the lease's next heartbeat, the metrics and the log (about ten lines a job)."""

        async def on_progress(record: Progress) -> None:
            recent = [*lease.progress.get("recent_losses", []), record.loss][-RECENT_LOSSES:]  # top's sparkline
            lease.report(**record.model_dump(mode="json"), recent_losses=recent)
            metrics.TRAINING_LOSS.labels(job.model).set(record.task_loss)
            metrics.EWC_PENALTY.labels(job.model).set(record.penalty)
            step, total = record.step, record.total_steps
            if step in (1, total) or step % max(1, total // 10) == 0:
                log.info(
                    "job %d: step %s/%s loss %.4f %.0f tok/s eta %.0fs",
                    job.id,
                    step,
                    total,
                    record.loss,
                    record.tokens_per_s,
                    record.eta_s,
                )

        return on_progress

    async def _upload(
        self, job: job_queue.Job, version: str, output: Path, numbers: dict[str, float | None]
    ) -> AdapterReleased:
        line = self.lines.for_line(job.model)
        window = await windows.get_window(self.db, job.window_id)
        files = await asyncio.to_thread(_hash_files, output)
        lora = await asyncio.to_thread(adapter_lora, output)
        sizes = await asyncio.to_thread(lambda: {name: (output / name).stat().st_size for name in files})
        event = build_release(
            model=job.model,
            version=version,
            parent_version=job.parent_version,
            base_model=line.model.base,
            uri=self.store.uri(job.model, version),
            files=files,
            file_sizes=sizes,
            size_bytes=sum(sizes.values()),
            lora=lora,
            ewc_lambda=line.ewc.lambda_,
            window=window,
            metrics=numbers,
            reason=job.reason if job.reason in ("threshold", "schedule", "manual") else "manual",  # type: ignore[arg-type]
            now=datetime.now(UTC),
            signer=self.signer,
        )
        (output / "manifest.json").write_text(json.dumps(manifest_of(event), indent=2, sort_keys=True))
        started = time.monotonic()
        await self.store.aensure_bucket()
        # Our reserved version: a retry may replace its own unreleased upload, never a released version.
        released = await registry.is_released(self.db, job.model, version)
        await self.store.aupload_folder(output, job.model, version, overwrite=not released)
        metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
        metrics.UPLOAD_BYTES.inc(event.size_bytes)
        return event


class PhaseClock:
    """A trainer's phases: each stored in the lease as it begins, each one's duration in the metrics."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.current: str | None = None
        self.since = 0.0
        self.seconds: dict[str, float] = {}

    async def enter(self, name: str) -> None:
        self._close()
        self.current, self.since = name, time.monotonic()
        self.lease.phase(name)

    def finish(self, warm: bool) -> None:
        """The trainer reported its result: the last phase ends; the start, base load and warmth are recorded."""
        self._close()
        label = "true" if warm else "false"
        metrics.TRAINER_JOBS.labels(label).inc()
        metrics.TRAINER_START_SECONDS.labels(label).observe(self.seconds.get("waiting_for_trainer", 0.0))
        if "loading_base" in self.seconds:
            metrics.TRAINER_BASE_LOAD_SECONDS.observe(self.seconds["loading_base"])

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.seconds.items())

    def _close(self) -> None:
        if self.current is not None:
            elapsed = time.monotonic() - self.since
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + elapsed
            metrics.TRAINER_PHASE_SECONDS.labels(self.current).observe(elapsed)
            self.current = None


def record_training_metrics(model: str, result: TrainResult) -> None:
    metrics.TRAINING_TOKENS_PER_SECOND.set(result.tokens / max(result.seconds, 1e-9))
    metrics.TRAINING_STEPS_PER_SECOND.set(result.steps / max(result.seconds, 1e-9))
    metrics.EVAL_LOSS.labels(model, "before").set(result.eval_loss_before)
    metrics.EVAL_LOSS.labels(model, "after").set(result.eval_loss_after)


def gate_of(line: Settings) -> GatePolicy:
    """The release gate of a line's settings."""
    learning = line.learning
    return GatePolicy(learning.gate, learning.max_forgetting, learning.min_improvement, learning.max_base_forgetting)


async def canary_for(settings: Settings, db: Database, model: str, version: str) -> job_queue.Canary | None:
    """Where ``version`` goes first: the canary of the line's live nodes that take part in canaries
    (``rollout.canary_fraction``), or None for every node at once (canaries off, no such node, or no production
    version yet to compare with)."""
    rollout = settings.rollout
    if rollout.canary_fraction <= 0:
        return None
    live = await fleet.live_nodes(db, model, rollout.node_timeout_s)
    if not live:
        log.info(
            "no live serving node of %s takes part in canaries (status within rollout.node_timeout_s, serving.canary"
            " on): %s goes to production",
            model,
            version,
        )
        return None
    if await registry.alias(db, model, "production") is None:
        log.info("%s has no production version to compare a canary with: %s goes to production", model, version)
        return None
    return job_queue.Canary(canary_nodes(live, model, rollout.canary_fraction), settings.kafka.canary_topic)


def release_metrics(result: TrainResult, decision: GateDecision) -> dict[str, float | None]:
    """The numbers that travel in the manifest and the event (flat, JSON numbers or null)."""
    numbers: dict[str, float | None] = {
        "train_loss": result.train_loss,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "ewc_penalty": result.ewc_penalty,
        "fisher_seconds": result.fisher_seconds,
        "seconds": result.seconds,
    }
    for set_name, losses in result.eval.items():
        numbers[f"{set_name}_loss_before"] = losses["before"]
        numbers[f"{set_name}_loss_after"] = losses["after"]
        if "base" in losses:
            numbers[f"{set_name}_loss_base"] = losses["base"]
    numbers["forgetting"] = decision.forgetting
    numbers["base_forgetting"] = decision.base_forgetting
    numbers["holdout_improvement"] = decision.improvement
    return numbers


def _fresh_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def adapter_lora(folder: Path) -> LoraSpec:
    """The trained adapter's shape, from its ``adapter_config.json``: a job continues its parent adapter, so a
    line keeps the rank and targets of its first version whatever the LoRA settings say now."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        targets = config["target_modules"]
        return LoraSpec(r=int(config["r"]), alpha=int(config["lora_alpha"]), target_modules=sorted(targets))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"the trained adapter's adapter_config.json is unreadable: {exc}") from None


def _hash_files(folder: Path) -> dict[str, str]:
    """sha256 of each adapter file (result.json is the child's report, not an artifact: removed)."""
    (folder / "result.json").unlink(missing_ok=True)
    return {p.name: sha256_bytes(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


async def serve_worker(settings: Settings, stop: asyncio.Event, once: bool = False) -> None:
    """`streamengine worker`: connect, expose metrics, process jobs until stopped."""
    from prometheus_client import start_http_server

    db = await Database.connect(settings.database)
    try:
        store = ObjectStore.from_settings(settings.storage)
        await store.aensure_bucket()
        if settings.metrics.port:
            start_http_server(settings.metrics.port, addr="0.0.0.0")
        worker = Worker(settings, db, store)
        if once:
            await worker.run_once()
        else:
            await worker.run(stop)
    finally:
        await db.close()
