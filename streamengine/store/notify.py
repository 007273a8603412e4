"""Wake-ups from PostgreSQL (LISTEN/NOTIFY) for the loops that would otherwise poll.

Triggers (migration 008) notify :data:`JOBS` when a job may have become claimable (created, queued
again, or one stopped running) and :data:`OUTBOX` when an outbox row is written; PostgreSQL delivers a
notification when its transaction commits. :class:`Wakeups` listens on a connection of its own and
:meth:`Wakeups.wait` returns at the first notification or after its timeout: the caller's slow poll,
the safety net for a notification that never arrives (the connection was down, PostgreSQL restarted,
a trigger was disabled). A lost connection is opened again at the next wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from streamengine.errors import ServiceUnavailable
from streamengine.store.db import Database

log = logging.getLogger(__name__)

JOBS = "streamengine_jobs"
OUTBOX = "streamengine_outbox"


class Wakeups:
    """Notifications on ``channel``, through a connection of its own (opened at the first :meth:`wait`)."""

    def __init__(self, db: Database, channel: str) -> None:
        self.db = db
        self.channel = channel
        self.listening = False
        self.notified = 0  # notifications heard
        self._conn: asyncpg.Connection | None = None
        self._woken = asyncio.Event()
        self._warned = False

    async def wait(self, timeout_s: float, stop: asyncio.Event | None = None) -> bool:
        """Wait for a notification (True), ``timeout_s`` or ``stop`` (False). A notification that came since
        the last wait counts at once, so none falls between a caller's check and its wait."""
        with contextlib.suppress(TimeoutError):  # PostgreSQL not answering: the poll goes on
            await asyncio.wait_for(self._listen(), timeout_s)
        waits = [asyncio.ensure_future(self._woken.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    async def close(self) -> None:
        conn, self._conn, self.listening = self._conn, None, False
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)

    async def _listen(self) -> None:
        """LISTEN on a fresh connection unless one listens; a failure leaves the caller's poll to it."""
        if self._conn is not None and not self._conn.is_closed():
            return
        self.listening = False
        conn = None
        try:
            conn = await self.db.connect_one()
            conn.add_termination_listener(self._lost)
            await conn.add_listener(self.channel, self._notified)
        except BaseException as exc:
            if conn is not None:
                conn.terminate()
            if not isinstance(exc, (ServiceUnavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                raise
            if not self._warned:
                log.warning("cannot LISTEN on %s (%s); polling until it can", self.channel, exc)
            self._warned = True
            return
        self._conn, self.listening, self._warned = conn, True, False
        self._woken.set()  # anything notified while nobody listened: look once

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notified += 1
        self._woken.set()

    def _lost(self, conn: Any) -> None:
        self.listening = False
