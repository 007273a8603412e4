"""A claimed job's lease, kept alive for as long as the worker works on the job.

The claim gives a worker the job for ``worker.lease_s``. :meth:`Lease.hold` runs the job's work and
renews the lease every ``worker.heartbeat_s`` (at least twice per lease) in every phase: data, training
or Fisher (the child process, evaluation included), upload, release. Each renewal stores the job's
progress; a new phase is stored at once (a renewal then, unless renewals are failing). A renewal that
fails (PostgreSQL restarting, a connection cut) is logged and tried again with back-off. When the lease
cannot be renewed before it runs out, or another worker holds it, the work is cancelled (the trainer
process dies with it, a warm one too) and :class:`LeaseLost` raised: the worker gives the job up
without releasing, and whoever claims it next starts it again. Without this a lease could lapse under a
live worker: a second worker trained the same job, and at the attempt limit a live job was marked
"worker lost".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from streamengine.config.settings import WorkerSettings
from streamengine.core.backoff import Backoff
from streamengine.errors import Conflict, StreamEngineError, is_transient
from streamengine.store import job_queue
from streamengine.store.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeaseLost(Conflict):
    """The worker no longer holds (or can no longer prove it holds) a job's lease: it abandons the job."""


class Lease:
    """One claimed job's lease; ``progress`` is what the next renewal stores (phase, training step...)."""

    def __init__(self, db: Database, job_id: int, owner: str, settings: WorkerSettings, claimed_at: float) -> None:
        """``claimed_at``: ``time.monotonic()`` before the claim (the lease surely lasts until then + lease_s)."""
        self.db = db
        self.job_id = job_id
        self.owner = owner
        self.lease_s = settings.lease_s
        self.interval_s = min(settings.heartbeat_s, settings.lease_s / 2)
        self.retry = Backoff(self.interval_s / 8, self.interval_s, jitter=0.5)
        self.progress: dict[str, Any] = {"phase": "preparing", "phase_started_at": time.time()}
        self._renewed_at = claimed_at
        self._renewing = asyncio.Lock()
        self._ended = False
        self._stopped = False
        self._new_phase = asyncio.Event()

    def phase(self, name: str) -> None:
        """The job entered phase ``name`` now (stored at once, with its start time)."""
        self.progress = {"phase": name, "phase_started_at": time.time()}
        self._new_phase.set()

    def report(self, **fields: Any) -> None:
        """Progress within the phase (a training step's numbers), stored with the next renewal."""
        phase = {name: self.progress[name] for name in ("phase", "phase_started_at")}
        self.progress = {**phase, **fields}

    async def hold(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` while renewing the lease; cancel it and raise :class:`LeaseLost` when the lease is lost.

        The work is cancelled and awaited whenever this returns or raises (a stopping worker too), so a
        trainer child never outlives its job's handling."""
        task = asyncio.ensure_future(work)
        keeper = asyncio.create_task(self._keep())
        try:
            await asyncio.wait({task, keeper}, return_when=asyncio.FIRST_COMPLETED)
            lost = None if task.done() else keeper.exception()
            if lost is None:  # the work ended, or it is past its last step (nothing left to keep)
                return await task
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise lost
        finally:
            self._stopped = True  # the keeper's loop ends on this too: a cancellation can be lost (see _pause)
            self._new_phase.set()
            for running in (task, keeper):
                running.cancel()
            await asyncio.gather(task, keeper, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def last_step(self) -> AsyncIterator[None]:
        """Around the transaction that ends the job (release, rejection, Fisher done): no renewal runs during
        it or after it (that transaction checks the lease itself, and a renewal after it would find none)."""
        async with self._renewing:
            self._ended = True
            yield

    async def _keep(self) -> None:
        """Renew until the job's last step; raise :class:`LeaseLost` once the lease is gone or ran out unrenewed."""
        failures, error = 0, ""
        while True:
            wait = self.retry.delay(failures, random.random()) if failures else self.interval_s
            await self._pause(max(0.0, min(wait, self._left())), early=not failures)
            async with self._renewing:
                if self._ended or self._stopped:
                    return
                if self._left() <= 0:
                    raise LeaseLost(f"job {self.job_id}: lease not renewed in {self.lease_s:g}s ({error}); abandoned")
                error = await self._renew()
            if failures and not error:
                log.info("job %d: lease renewed after %d failed tries", self.job_id, failures)
            failures = failures + 1 if error else 0

    async def _pause(self, seconds: float, early: bool) -> None:
        """Wait ``seconds``; ``early``: a new phase ends the wait.

        ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` returns, instead of raising, when it
        is cancelled in the loop iteration its awaitable completes in (a phase set as the work ends), and the
        renewals went on forever."""
        if early:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._new_phase.wait()
        else:
            await asyncio.sleep(seconds)
        self._new_phase.clear()

    def _left(self) -> float:
        """Seconds until the lease surely runs out, unless renewed."""
        return self._renewed_at + self.lease_s - time.monotonic()

    async def _renew(self) -> str:
        """Renew once: "" when renewed, why not when it failed for a reason worth retrying."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._left()):
                held = await job_queue.heartbeat(self.db, self.job_id, self.owner, self.lease_s, self.progress)
        except Exception as exc:
            if not (isinstance(exc, StreamEngineError) or is_transient(exc)):
                raise
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log.warning("job %d: lease renewal failed (%s), %.1fs left; retrying", self.job_id, error, self._left())
            return error
        if not held:
            raise LeaseLost(f"job {self.job_id}: another worker holds the lease; abandoned")
        self._renewed_at = started
        return ""
