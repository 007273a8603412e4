"""Runs the training recipe in a child process and streams its progress.

A crash, OOM kill or hang in training ends the child, never the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streamengine.errors import TrainingError

log = logging.getLogger(__name__)

ProgressHandler = Callable[[dict[str, Any]], Awaitable[None]]


class TrainingCrashed(TrainingError):
    """The child died without reporting a result (signal, OOM kill, interpreter crash): retryable."""


async def run_training(argv: list[str], log_path: Path, on_progress: ProgressHandler) -> dict[str, Any]:
    """Run a training child (``argv``, e.g. ``python -m streamengine.training.recipe SPEC``); return its
    result record.

    Raises :class:`TrainingError` with the child's own message when training failed (diverged, bad
    input) and :class:`TrainingCrashed` when it died.
    """
    with log_path.open("ab") as stderr:
        child = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            assert child.stdout is not None
            async for raw in child.stdout:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                kind = record.pop("event", None)
                if kind == "progress":
                    await on_progress(record)
                elif kind == "result":
                    result = record
                elif kind == "error":
                    error = str(record.get("message", "training failed"))
            code = await child.wait()
        except BaseException:
            if child.returncode is None:
                child.kill()
                await child.wait()
            raise
    if error is not None:
        raise TrainingError(error)
    if code != 0 or result is None:
        raise TrainingCrashed(f"training process exited with code {code} without a result (see {log_path})")
    return result
