"""Local adapter folders: hashing, verification against expected sha256s and sizes, atomic replacement."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from streamengine.errors import ConfigError, IntegrityError

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: Path, expected: dict[str, str]) -> str | None:
    """None when ``folder`` holds exactly the expected files with their hashes, else the problem."""
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if file_sha256(path) != want.lower():
            return f"{name}: sha256 does not match"
    extra = sorted({p.name for p in folder.iterdir()} - set(expected))
    return f"unexpected files {', '.join(extra)}" if extra else None


def replace_dir(tmp: Path, dest: Path, expected: dict[str, str]) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is kept if already right, else moved away."""
    try:
        os.rename(tmp, dest)
        return
    except OSError:
        if not dest.exists():
            raise
    if verify(dest, expected) is None:
        return  # someone (another process) put the same verified files there first
    trash = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(dest, trash)
    os.rename(tmp, dest)
    shutil.rmtree(trash, ignore_errors=True)


def check_model(model: str) -> None:
    parts = model.split("/")
    if not model or model.startswith("/") or "\\" in model or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"'{model}' is not a valid model name for object storage")


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/model/version/`` -> (bucket, ``model/version/``)."""
    if not uri.startswith("s3://"):
        raise IntegrityError(f"adapter uri {uri!r} is not an s3:// uri")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket or not prefix.strip("/") or ".." in prefix.split("/"):
        raise IntegrityError(f"adapter uri {uri!r} does not name a bucket and a folder")
    return bucket, prefix.rstrip("/") + "/"


@dataclass(frozen=True, slots=True)
class DownloadLimits:
    """Bounds of one download: what the release declares (per file, in total) and what the node allows."""

    sizes: Mapping[str, int] = field(default_factory=dict)
    declared_total: int | None = None
    max_total: int | None = None
    file_timeout_s: float | None = None

    def budget(self, name: str, used: int) -> tuple[int, str] | None:
        """The most bytes file ``name`` may have once the others took ``used``, and what sets that bound."""
        bounds = []
        if name in self.sizes:
            bounds.append((self.sizes[name], f"its declared size of {self.sizes[name]} bytes"))
        if self.declared_total is not None:
            bounds.append((self.declared_total - used, f"the release's size_bytes ({self.declared_total})"))
        if self.max_total is not None:
            bounds.append((self.max_total - used, f"serving.max_adapter_bytes ({self.max_total})"))
        return min(bounds, default=None)


def write_chunks(chunks: Iterable[bytes], target: Path, budget: tuple[int, str] | None) -> tuple[str, int, float]:
    """Write ``chunks`` to ``target``: (sha256, size, seconds spent hashing). IntegrityError as soon as the
    file grows past ``budget`` (bytes, and what sets that bound), before writing the chunk that would."""
    digest, size, hashing = hashlib.sha256(), 0, 0.0
    with target.open("wb") as out:
        for chunk in chunks:
            if budget is not None and size + len(chunk) > budget[0]:
                raise IntegrityError(
                    f"{target.name}: more bytes than {budget[1]}; download stopped after {size + len(chunk)}"
                )
            started = time.perf_counter()
            digest.update(chunk)
            hashing += time.perf_counter() - started
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, hashing
