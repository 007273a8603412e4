"""A worker's warm trainer: one trainer process kept between training jobs (:mod:`streamengine.training.warm`).

The process is started like a one-job trainer (:func:`~streamengine.jobs.trainer_process.start_child`: the
filtered environment, death with the worker, ``worker.trainer_memory_limit_mb``), imports torch once and
keeps the base model loaded, so a job pays neither the start nor the load. Jobs go to it one at a time
over its stdin; its lines are read as a one-job trainer's are. Between jobs, in the background, the process
is checked and replaced by a fresh one (its base loaded again) when:

- a job failed (the process ends after any failure: a failure's leftovers never meet the next job),
- it ended or died (a crash, a kill, the kernel's out-of-memory killer),
- it ran ``worker.max_jobs_per_process`` jobs,
- its resident memory grew past ``worker.warm_max_rss_mb`` (unset: twice what it held after its first job).

It takes jobs trained in one process on an unquantized base (:func:`takes`). Training in several processes
(torchrun) starts its processes per job, and so does a quantized base: bitsandbytes repacks a 4-bit base's
weights in place the first time it runs on the CPU (0.50.2: the quantization state differed after one job
and the next job's losses by ~1e-4), so a kept quantized base would not stay as loaded.

A job that dies with the process, or whose process cannot start, fails as a one-job trainer's does
(:class:`~streamengine.jobs.trainer_process.TrainingCrashed`, retried; out of memory, not retried). A job
that is cancelled (its lease lost, the worker stopping) kills the process: the next job gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import weakref
from pathlib import Path

from streamengine import metrics
from streamengine.config.settings import WorkerSettings
from streamengine.jobs.trainer_process import (
    PhaseHandler,
    ProgressHandler,
    ended_failure,
    json_object,
    read_report,
    start_child,
)
from streamengine.training.launch import warm_command
from streamengine.training.spec import TrainResult, TrainSpec
from streamengine.training.warm_protocol import Preload, Ready, TrainJob

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
"""How long a warm trainer asked to end (stdin closed) may take before it is killed."""


def takes(processes: int, quantization: str) -> bool:
    """Whether a job trained in ``processes`` processes on a base quantized as ``quantization`` runs warm."""
    return processes == 1 and quantization == "none"


class _Process:
    """One warm trainer process and the last :class:`Ready` line it printed."""

    def __init__(self, child: asyncio.subprocess.Process, log_path: Path, log_start: int) -> None:
        self.child = child
        self.log_path = log_path
        self.log_start = log_start  # where its lines begin in log_path
        self.ready: Ready | None = None
        self.first_rss = 0  # resident memory after its first job

    @property
    def alive(self) -> bool:
        return self.child.returncode is None

    async def wait_ready(self) -> Ready | None:
        """Its next ``ready`` line; None when it ended first (an ``error`` line before it is logged)."""
        assert self.child.stdout is not None
        async for raw in self.child.stdout:
            record = json_object(raw)
            kind = record.pop("event", None)
            if kind == "ready":
                self.ready = Ready.model_validate(record)
                if self.ready.jobs == 1:
                    self.first_rss = self.ready.rss_bytes
                return self.ready
            if kind == "error":
                log.warning("warm trainer %d: %s", self.child.pid, record.get("message"))
        await self.child.wait()
        return None

    async def send(self, request: Preload | TrainJob) -> None:
        """One request line; a process that ended meanwhile shows as the end of its output instead."""
        assert self.child.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.child.stdin.write(request.model_dump_json().encode() + b"\n")
            await self.child.stdin.drain()

    async def stop(self) -> None:
        """Ask it to end (stdin closed); kill it when it does not within :data:`STOP_GRACE_S`."""
        if self.child.stdin is not None:
            self.child.stdin.close()
        try:
            await asyncio.wait_for(self.child.wait(), STOP_GRACE_S)
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        if self.alive:
            self.child.kill()
        await self.child.wait()


class WarmTrainer:
    """The worker's warm trainer (see the module docstring); one job at a time."""

    def __init__(self, settings: WorkerSettings, log_path: Path, memory_limit_mb: int | None = None) -> None:
        """``log_path``: where the processes' output outside jobs goes (a job's goes to its own log)."""
        self.settings = settings
        self.log_path = log_path
        self.memory_limit_mb = memory_limit_mb
        self.preload: Preload | None = None  # the base a fresh process loads before its first job
        self._next: asyncio.Task[_Process | None] | None = None  # the process the next job gets, settling
        self._pids: set[int] = set()
        weakref.finalize(self, _kill_all, self._pids)  # a worker dropped without close() leaves no process

    def prewarm(self, preload: Preload) -> None:
        """Start a process and load ``preload``'s base in the background (unless one is on its way)."""
        self.preload = preload
        if self._next is None:
            self._next = asyncio.create_task(self._fresh(preload))

    async def train(
        self, spec: TrainSpec, log_path: Path, on_progress: ProgressHandler, on_phase: PhaseHandler
    ) -> tuple[TrainResult, bool]:
        """Run one job; returns its result and whether it ran warm (a process waiting, the base loaded)."""
        await on_phase("waiting_for_trainer")
        process, started = await self._take()
        assert process.ready is not None
        warm = not started and spec.base_model in process.ready.bases
        self.preload = Preload(base_model=spec.base_model, device=spec.training.device, quantization=spec.quantization)
        start = _size(log_path)  # this job's lines begin here
        assert process.child.stdout is not None
        try:
            await process.send(TrainJob(spec=spec, log_path=str(log_path)))
            report = await read_report(process.child.stdout, TrainResult, on_progress, on_phase)
            ended = report.result is None and report.error is None
            code = await process.child.wait() if ended else None
        except BaseException:
            await asyncio.shield(process.kill())
            self._forget(process)
            raise
        self._next = asyncio.create_task(self._settle(process, failed=report.result is None))
        return report.outcome(code, log_path, start, self.memory_limit_mb), warm

    async def ready(self) -> Ready | None:
        """What the process the next job gets said once settled; None when none waits (the next job starts one)."""
        if self._next is None:
            return None
        try:
            process = await asyncio.shield(self._next)
        except Exception:
            return None
        return process.ready if process is not None and process.alive else None

    async def close(self) -> None:
        """End the process (between jobs) and anything starting."""
        pending, self._next = self._next, None
        if pending is None:
            return
        if not pending.done():
            pending.cancel()
        process = (await asyncio.gather(pending, return_exceptions=True))[0]
        if isinstance(process, _Process):
            await process.stop()
            self._forget(process)

    async def _take(self) -> tuple[_Process, bool]:
        """A process ready for a job: the one settled in the background, else one started now (True).

        A process started for the job that ends before it is ready fails the job (as a one-job trainer that
        cannot start does)."""
        pending, self._next = self._next, None
        process = None
        if pending is not None:
            try:
                process = await pending
            except Exception as exc:  # it could not be started (e.g. no memory to fork): try once more now
                log.warning("warm trainer could not be made ready: %s: %s", type(exc).__name__, exc)
        if process is not None and process.alive:
            return process, False
        process = await self._start()
        try:
            ready = await process.wait_ready()
        except BaseException:
            await asyncio.shield(process.kill())
            raise
        finally:
            if not process.alive:
                self._forget(process)
        if ready is None:
            code = process.child.returncode or 0
            raise ended_failure(code, process.log_path, process.log_start, self.memory_limit_mb)
        return process, True

    async def _start(self) -> _Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as stderr:
            start = stderr.tell()
            child = await start_child(
                warm_command(self.settings.warm_bases), stderr, self.memory_limit_mb, stdin=asyncio.subprocess.PIPE
            )
        self._pids.add(child.pid)
        log.info("warm trainer %d starting (log: %s)", child.pid, self.log_path)
        return _Process(child, self.log_path, start)

    async def _fresh(self, preload: Preload | None) -> _Process | None:
        """A new process, ready and holding ``preload``'s base; None when it ended before (the next job starts
        one itself, so a process that cannot start fails that job instead of restarting in a loop)."""
        process = await self._start()
        try:
            ready = await process.wait_ready()
            if ready is not None and preload is not None:
                await process.send(preload)
                ready = await process.wait_ready()
        except BaseException:
            await asyncio.shield(process.kill())
            self._forget(process)
            raise
        if ready is None:
            log.warning("warm trainer %d ended before it was ready (log: %s)", process.child.pid, self.log_path)
            self._forget(process)
            return None
        if ready.base_loads:
            metrics.TRAINER_BASE_LOAD_SECONDS.observe(ready.last_base_load_s)
        return process

    async def _settle(self, process: _Process, failed: bool) -> _Process | None:
        """After a job: the process again when it is ready and within its limits, else a fresh one."""
        try:
            ready = None if failed else await process.wait_ready()
        except BaseException:
            await asyncio.shield(process.kill())
            self._forget(process)
            raise
        reason = "failed" if failed else self._retire_reason(process, ready)
        if reason is None:
            return process
        metrics.TRAINER_RESTARTS.labels(reason).inc()
        log.info("warm trainer %d replaced (%s)", process.child.pid, reason)
        await process.stop()
        self._forget(process)
        return await self._fresh(self.preload)

    def _retire_reason(self, process: _Process, ready: Ready | None) -> str | None:
        if ready is None:
            return "ended"
        metrics.TRAINER_MEMORY.set(ready.rss_bytes)
        if ready.jobs >= self.settings.max_jobs_per_process:
            return "job_limit"
        limit_mb = self.settings.warm_max_rss_mb
        limit = limit_mb << 20 if limit_mb else 2 * process.first_rss
        return "memory" if ready.rss_bytes > limit else None

    def _forget(self, process: _Process) -> None:
        self._pids.discard(process.child.pid)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
