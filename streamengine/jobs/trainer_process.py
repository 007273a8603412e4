"""Runs a training (or Fisher) job in a child process, streams its progress and parses its result.

A crash, OOM kill or hang in training ends the child, never the worker; the child dies with the worker
and sees none of its secrets (:mod:`streamengine.training.child`). What ended a child is said in the error
the job records: the child's own message (diverged, bad input), "out of memory" (an allocation failed, e.g.
above ``worker.trainer_memory_limit_mb``), "killed by signal 9 (SIGKILL...)" (e.g. the kernel's OOM killer),
or its exit code with the last line it logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from streamengine.errors import TrainingError
from streamengine.training import child as child_process
from streamengine.training.spec import Progress

log = logging.getLogger(__name__)

ProgressHandler = Callable[[Progress], Awaitable[None]]
Result = TypeVar("Result", bound=BaseModel)
# What a failed allocation says: torch's CPU and CUDA allocators, Python, the C library, OpenBLAS, the loader.
_OOM_MARKERS = (
    "out of memory",
    "outofmemoryerror",
    "memoryerror",
    "can't allocate memory",
    "cannot allocate memory",
    "memory allocation",
    "failed to map segment",
    "bad_alloc",  # C++ (libtorch, the tokenizers): std::bad_alloc, then terminate() aborts the process
)


class TrainingCrashed(TrainingError):
    """The child died without reporting a result (signal, OOM kill, interpreter crash): retryable."""


def out_of_memory(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _OOM_MARKERS)


def _last_line(log_path: Path, start: int) -> str:
    """The last non-empty line this child wrote to ``log_path`` (from byte ``start``), shortened."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(max(start, log_path.stat().st_size - 8192))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), "")


def _failure(code: int, log_path: Path, start: int, memory_limit_mb: int | None) -> TrainingError:
    """Why a child that reported no result ended: a retryable crash, or out of memory (not retried)."""
    last = _last_line(log_path, start)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "unknown"
        why = "; the kernel's out-of-memory killer sends it" if -code == signal.SIGKILL else ""
        message = f"training process killed by signal {-code} ({name}{why}): {last or 'no output'} (log: {log_path})"
    else:
        message = f"training process exited with code {code} without a result: {last or 'no output'} (log: {log_path})"
    return TrainingError(memory_message(message, memory_limit_mb)) if out_of_memory(last) else TrainingCrashed(message)


def memory_message(message: str, memory_limit_mb: int | None) -> str:
    """``message`` starting with "out of memory", naming the limit when one is set."""
    text = message if message.lower().startswith("out of memory") else f"out of memory: {message}"
    return text + (f" (worker.trainer_memory_limit_mb = {memory_limit_mb})" if memory_limit_mb else "")


async def run_training(
    argv: list[str],
    log_path: Path,
    result_type: type[Result],
    on_progress: ProgressHandler | None = None,
    memory_limit_mb: int | None = None,
) -> Result:
    """Run a child (``argv``, e.g. :func:`~streamengine.training.launch.training_command`); return its result
    line as a ``result_type``. ``memory_limit_mb`` caps the memory the child may allocate.

    Raises :class:`TrainingError` with the child's own message when training failed (diverged, bad
    input, out of memory) and :class:`TrainingCrashed` when it died.
    """
    with log_path.open("ab") as stderr:
        start = stderr.tell()  # this child's lines begin here
        child = await asyncio.create_subprocess_exec(
            *child_process.command(argv, memory_limit_mb),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=child_process.environment(),
        )
        result: Result | None = None
        error: str | None = None
        try:
            assert child.stdout is not None
            async for raw in child.stdout:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                kind = record.pop("event", None)
                if kind == "progress" and on_progress is not None:
                    await on_progress(_parse(Progress, record))
                elif kind == "result":
                    result = _parse(result_type, record)
                elif kind == "error":
                    error = str(record.get("message", "training failed"))
            code = await child.wait()
        except BaseException:
            if child.returncode is None:
                child.kill()
                await child.wait()
            raise
    if error is not None:
        raise TrainingError(memory_message(error, memory_limit_mb) if out_of_memory(error) else error)
    if code != 0 or result is None:
        raise _failure(code, log_path, start, memory_limit_mb)
    return result


def _parse(model: type[Result], record: dict[str, Any]) -> Result:
    """A line of the child as ``model``; a line that does not fit is a :class:`TrainingError` (not retried)."""
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        raise TrainingError(f"the training process reported an invalid {model.__name__}: {exc}") from None
