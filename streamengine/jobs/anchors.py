"""A job's anchor set: the user's curated one, else the base model's self-anchor set.

The self-anchor set (``learning.self_anchor``; docs/learning.md) is built once per base model, by a child
process (:mod:`streamengine.training.anchor_job`), and stored in S3 beside the adapters, under
``self-anchors/<key>/v1.0/`` (``anchors.jsonl`` and a ``manifest.json`` holding its sha256, the base, the
sources and the filters' counts). Every later job of every model line on that base downloads it (checked
against the sha256) instead of building it again. The key hashes what decides the set: the base model
(``model.base`` and ``model.quantization``), the ``self_anchor`` settings and the bytes of the prompt file,
so another base (or other settings) builds another set. Two workers building the same key at once both
succeed: the second upload finds the first's manifest and uses that set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from streamengine.config.settings import Settings
from streamengine.core.manifest import sha256_bytes
from streamengine.errors import Conflict
from streamengine.store import samples as sample_store
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from streamengine.training.launch import anchor_command
from streamengine.training.spec import AnchorResult, AnchorSpec

log = logging.getLogger(__name__)

ANCHOR_FILE = "anchors.jsonl"
SET_VERSION = "v1.0"  # the folder of the set's format, as version folders are named
FORMAT = "streamengine.self-anchors/1"
RunChild = Callable[[list[str], Path, type[AnchorResult]], Awaitable[AnchorResult]]


def set_key(settings: Settings) -> str:
    """sha256 (first 16 hex digits) of the base model, the self-anchor settings and the prompt file's bytes."""
    cfg = settings.learning.self_anchor
    prompts = cfg.prompts_path.read_bytes() if cfg.prompts_path else b""
    decided = {
        "base": settings.model.base,
        "quantization": settings.model.quantization,
        "self_anchor": cfg.model_dump(mode="json", exclude={"prompts_path"}),
        "prompts_sha256": hashlib.sha256(prompts).hexdigest() if cfg.prompts_path else None,
    }
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def set_name(settings: Settings) -> str:
    """The set's folder in the bucket, as a model name: ``self-anchors/<key>``."""
    return f"self-anchors/{set_key(settings)}"


async def job_anchor_set(
    settings: Settings, db: Database, store: ObjectStore, folder: Path, run_child: RunChild
) -> Path | None:
    """The anchor set this job trains and is gated on: ``learning.anchor_path``, else the self-anchor set
    (downloaded, or built and stored first), else None (``self_anchor.enabled`` false)."""
    learning = settings.learning
    if learning.anchor_path is not None:
        return learning.anchor_path
    if not learning.self_anchor.enabled:
        return None
    name = set_name(settings)
    if not await store.aexists(name, SET_VERSION):
        await _build(settings, db, store, name, folder / "self-anchors-build", run_child)
    manifest = await store.aread_manifest(name, SET_VERSION)
    files = {ANCHOR_FILE: manifest["files"][ANCHOR_FILE]}
    return await store.adownload_folder(name, SET_VERSION, folder / "self-anchors", files) / ANCHOR_FILE


async def _build(
    settings: Settings, db: Database, store: ObjectStore, name: str, folder: Path, run_child: RunChild
) -> None:
    """Build the set in a child process, then upload it with its manifest."""
    cfg = settings.learning.self_anchor
    out = folder / "out"
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    stream_path = None
    if cfg.stream_prompts:
        prompts = await sample_store.stream_prompts(db, cfg.stream_prompts, seed=f"self-anchors-{cfg.seed}")
        stream_path = folder / "stream-prompts.jsonl"
        lines = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
        await asyncio.to_thread(stream_path.write_text, lines, encoding="utf-8")
    spec = AnchorSpec(
        base_model=settings.model.base,
        out_path=str(out / ANCHOR_FILE),
        prompts_path=str(cfg.prompts_path) if cfg.prompts_path else None,
        stream_path=str(stream_path) if stream_path else None,
        self_anchor=cfg,
        device=settings.training.device,
        quantization=settings.model.quantization,
    )
    spec_path = folder / "anchor-spec.json"
    await asyncio.to_thread(spec.write, spec_path)
    result = await run_child(anchor_command(spec_path), folder / "anchors.log", AnchorResult)
    data = await asyncio.to_thread((out / ANCHOR_FILE).read_bytes)
    manifest = {
        "format": FORMAT,
        "base_model": settings.model.base,
        "files": {ANCHOR_FILE: sha256_bytes(data)},
        **result.model_dump(mode="json", include={"samples", "sources", "dropped", "seconds"}),
        "created_at": datetime.now(UTC).isoformat(),
    }
    await asyncio.to_thread((out / "manifest.json").write_text, json.dumps(manifest, indent=2, sort_keys=True))
    try:
        await store.aupload_folder(out, name, SET_VERSION)
    except Conflict:
        log.info("self-anchor set %s was stored by another worker meanwhile: using that one", name)
        return
    log.info(
        "self-anchor set %s built: %d samples (%s) in %.1fs",
        name, result.samples, ", ".join(f"{k} {v}" for k, v in result.sources.items()), result.seconds,
    )  # fmt: skip
