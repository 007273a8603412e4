"""Atomic file writes, shared by the engine, the trainer and serving nodes (standard library only).

A file is written under a scratch name beside it and renamed into place, so a reader (or a process
that restarts after a crash) finds the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def scratch_path(path: Path) -> Path:
    """Where :func:`replacing` writes ``path`` before renaming it (a hidden file in the same folder)."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the scratch path to write; it replaces ``path`` when the block succeeds and is removed if it fails."""
    scratch = scratch_path(path)
    try:
        yield scratch
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with replacing(path) as scratch:
        scratch.write_text(text, encoding="utf-8")
