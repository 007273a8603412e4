"""Local adapter folders: hashing, verification against expected sha256s, atomic replacement."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
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
