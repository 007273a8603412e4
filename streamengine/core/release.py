"""Building the release record: the AdapterReleased event, which is also the manifest (pure)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from streamengine.contract.events import AdapterCanary, AdapterReleased, LoraSpec, ReleaseReason, WindowSpec
from streamengine.core.manifest import SIGNATURE_FIELDS, Signer


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
    signer: Signer | None,
    file_sizes: dict[str, int] | None = None,
) -> AdapterReleased:
    """The event announcing ``version``; signed over its canonical form when a signer is given.

    It has no ``sequence`` yet: the registry numbers it when it queues it (:func:`sequenced`)."""
    return _signed(
        {
            "model": model,
            "version": version,
            "parent_version": parent_version,
            "base_model": base_model,
            "uri": uri,
            "files": files,
            "file_sizes": file_sizes,
            "size_bytes": size_bytes,
            "lora": lora,
            "ewc_lambda": ewc_lambda,
            "window": window,
            "metrics": metrics,
            "reason": reason,
            "created_at": now,
        },
        signer,
    )


def republish(
    event: AdapterReleased, reason: ReleaseReason, now: datetime, signer: Signer | None, sequence: int | None = None
) -> AdapterReleased:
    """The same version announced again (deploy, rollback): new id, reason, time and sequence, signed again."""
    data = event.model_dump(exclude={"event_id", *SIGNATURE_FIELDS})
    data.update(reason=reason, created_at=now, sequence=sequence)
    return _signed(data, signer)


def sequenced(event: AdapterReleased, sequence: int, signer: Signer | None) -> AdapterReleased:
    """``event`` numbered ``sequence`` in its model line (the registry does, as it queues it), signed again."""
    data = event.model_dump(exclude={"event_id", *SIGNATURE_FIELDS})
    data.update(sequence=sequence)
    return _signed(data, signer, event.event_id)


def canary_record(
    event: AdapterReleased,
    *,
    stage: Literal["canary", "ended"],
    nodes: list[str],
    production: str | None,
    outcome: Literal["promoted", "rolled_back", "aborted"] | None,
    now: datetime,
    signer: Signer | None,
    sequence: int,
) -> AdapterCanary:
    """The AdapterCanary record of a version on trial (``stage`` canary) or of its trial's end, signed."""
    data = event.model_dump(exclude={"event_id", *SIGNATURE_FIELDS})
    data.update(
        created_at=now,
        sequence=sequence,
        stage=stage,
        canary_nodes=nodes,
        production_version=production,
        outcome=outcome,
    )
    record = _signed(data, signer, model=AdapterCanary)
    assert isinstance(record, AdapterCanary)
    return record


def manifest_of(event: AdapterReleased) -> dict[str, Any]:
    """``manifest.json``: everything in the event but its per-publication id."""
    return event.model_dump(mode="json", exclude={"event_id"})


def _signed(
    fields: dict[str, Any],
    signer: Signer | None,
    event_id: str | None = None,
    model: type[AdapterReleased] = AdapterReleased,
) -> AdapterReleased:
    event = model(event_id=event_id or str(uuid.uuid4()), **fields)
    if signer is not None:
        for name, value in signer.signatures(event.model_dump(mode="json")).items():
            setattr(event, name, value)
    return event
