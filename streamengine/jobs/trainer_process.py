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
from asyncio.subprocess import Process
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from streamengine.errors import TrainingError
from streamengine.training import child as child_process
from streamengine.training.spec import Progress

log = logging.getLogger(__name__)

ProgressHandler = Callable[[Progress], Awaitable[None]]
PhaseHandler = Callable[[str], Awaitable[None]]
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


def ended_failure(code: int, log_path: Path, start: int, memory_limit_mb: int | None) -> TrainingError:
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
    on_phase: PhaseHandler | None = None,
) -> Result:
    """Run a child (``argv``, e.g. :func:`~streamengine.training.launch.training_command`); return its result
    line as a ``result_type``. ``memory_limit_mb`` caps the memory the child may allocate.

    Raises :class:`TrainingError` with the child's own message when training failed (diverged, bad
    input, out of memory) and :class:`TrainingCrashed` when it died.
    """
    with log_path.open("ab") as stderr:
        start = stderr.tell()  # this child's lines begin here
        child = await start_child(argv, stderr, memory_limit_mb)
        try:
            assert child.stdout is not None
            report = await read_report(child.stdout, result_type, on_progress, on_phase)
            await child.stdout.read()  # whatever follows its last line, up to its end
            code = await child.wait()
        except BaseException:
            if child.returncode is None:
                child.kill()
                await child.wait()
            raise
    return report.outcome(code, log_path, start, memory_limit_mb)


async def start_child(
    argv: list[str], stderr: IO[bytes], memory_limit_mb: int | None, stdin: int | None = None
) -> Process:
    """``argv`` as a trainer child: the filtered environment, death with this process, the memory cap;
    ``stdin`` ``asyncio.subprocess.PIPE`` for a child that reads requests (a warm trainer)."""
    return await asyncio.create_subprocess_exec(
        *child_process.command(argv, memory_limit_mb),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=child_process.environment(),
    )


@dataclass
class Report(Generic[Result]):
    """What a trainer reported for one job: its result, or its error message; neither when it died first."""

    result: Result | None = None
    error: str | None = None

    def outcome(self, code: int | None, log_path: Path, start: int, memory_limit_mb: int | None) -> Result:
        """The result, or the error to raise: the trainer's message, else why it ended (``code``, its log)."""
        if self.error is not None:
            error = self.error
            raise TrainingError(memory_message(error, memory_limit_mb) if out_of_memory(error) else error)
        if self.result is None or code not in (0, None):
            raise ended_failure(code or 0, log_path, start, memory_limit_mb)
        return self.result


async def read_report(
    stdout: asyncio.StreamReader,
    result_type: type[Result],
    on_progress: ProgressHandler | None = None,
    on_phase: PhaseHandler | None = None,
) -> Report[Result]:
    """Read a trainer's JSON lines up to its ``result`` or ``error`` line (or the end of its output), passing
    ``progress`` and ``phase`` lines on; lines that are not JSON objects are skipped."""
    async for raw in stdout:
        record = json_object(raw)
        kind = record.pop("event", None)
        if kind == "progress" and on_progress is not None:
            await on_progress(_parse(Progress, record))
        elif kind == "phase" and on_phase is not None:
            await on_phase(str(record.get("phase", "")))
        elif kind == "result":
            return Report(result=_parse(result_type, record))
        elif kind == "error":
            return Report(error=str(record.get("message", "training failed")))
    return Report()


def json_object(raw: bytes) -> dict[str, Any]:
    """A line as a JSON object; {} for anything else."""
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _parse(model: type[Result], record: dict[str, Any]) -> Result:
    """A line of the child as ``model``; a line that does not fit is a :class:`TrainingError` (not retried)."""
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        raise TrainingError(f"the training process reported an invalid {model.__name__}: {exc}") from None
