"""Atomic writes: a reader finds the old file or the new one, never a part, and no scratch file stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamengine.files import replacing, scratch_path, write_text_atomic


def test_write_replaces_the_file_and_leaves_no_scratch(tmp_path: Path) -> None:
    path = tmp_path / "current.json"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new \u00e9\n")
    assert path.read_text(encoding="utf-8") == "new \u00e9\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "fisher.safetensors"
    path.write_bytes(b"complete")
    with pytest.raises(OSError, match="disk full"), replacing(path) as scratch:
        scratch.write_bytes(b"half of a")
        raise OSError("disk full")
    assert path.read_bytes() == b"complete"
    assert not scratch_path(path).exists()


def test_the_scratch_file_is_hidden_beside_the_target(tmp_path: Path) -> None:
    assert scratch_path(tmp_path / "result.json") == tmp_path / ".result.json.tmp"
