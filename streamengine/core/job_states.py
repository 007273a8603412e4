"""The states of a job in the queue: the one list the store, the jobs gauge, the API and the CLI use.

``queued`` -> ``running`` (claimed, with a lease) -> one end: ``released`` (a training job's version),
``rejected`` (the release gate refused the candidate), ``failed``, or ``done`` (a Fisher job). A failed
attempt that may be retried goes back to ``queued``. The ``jobs.state`` CHECK constraint in
``store/migrations`` lists the same values.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["queued", "running", "released", "rejected", "failed", "done"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")
"""Waiting or in progress: the job still needs its window's samples."""
FINISHED_STATES: tuple[JobState, ...] = tuple(s for s in JOB_STATES if s not in ACTIVE_STATES)
