"""Building the release record: the AdapterReleased event, which is also the manifest (pure)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from streamengine.contract.events import AdapterReleased, LoraSpec, ReleaseReason, WindowSpec
from streamengine.core.manifest import sign


def build_release(
    *,
    model: str,
    version: str,
    parent_version: str | None,
    base_model: str,
    uri: str,
    files: dict[str, str],
    size_bytes: int,
    lora: LoraSpec,
    ewc_lambda: float,
    window: WindowSpec | None,
    metrics: dict[str, float | None],
    reason: ReleaseReason,
    now: datetime,
    signing_key: str | None,
) -> AdapterReleased:
    """The event announcing ``version``; signed over its canonical form when a key is given."""
    return _signed(
        {
            "model": model,
            "version": version,
            "parent_version": parent_version,
            "base_model": base_model,
            "uri": uri,
            "files": files,
            "size_bytes": size_bytes,
            "lora": lora,
            "ewc_lambda": ewc_lambda,
            "window": window,
            "metrics": metrics,
            "reason": reason,
            "created_at": now,
        },
        signing_key,
    )


def republish(event: AdapterReleased, reason: ReleaseReason, now: datetime, signing_key: str | None) -> AdapterReleased:
    """The same version announced again (deploy, rollback): new id, reason and time, re-signed."""
    data = event.model_dump(exclude={"event_id", "signature"})
    data.update(reason=reason, created_at=now)
    return _signed(data, signing_key)


def manifest_of(event: AdapterReleased) -> dict[str, Any]:
    """``manifest.json``: everything in the event but its per-publication id."""
    return event.model_dump(mode="json", exclude={"event_id"})


def _signed(fields: dict[str, Any], signing_key: str | None) -> AdapterReleased:
    event = AdapterReleased(event_id=str(uuid.uuid4()), **fields)
    if signing_key:
        event.signature = sign(event.model_dump(mode="json"), signing_key)
    return event
