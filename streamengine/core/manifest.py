"""Adapter manifests: canonical form, file hashes and HMAC signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIGNED_FIELDS_EXCLUDE = frozenset({"signature", "event_id"})
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".md", ".jinja", ".model")


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8; ``signature`` and ``event_id`` are left out."""
    body = {k: v for k, v in manifest.items() if k not in SIGNED_FIELDS_EXCLUDE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def sign(manifest: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode(), canonical_bytes(manifest), hashlib.sha256).hexdigest()


def signature_valid(manifest: dict[str, Any], key: str) -> bool:
    given = manifest.get("signature")
    return isinstance(given, str) and hmac.compare_digest(given, sign(manifest, key))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_safe_artifact(name: str) -> bool:
    """Only safetensors and plain-text files travel; pickles (.bin, .pt, .pkl...) never do."""
    return "/" not in name and not name.startswith(".") and name.endswith(ALLOWED_SUFFIXES)


# Files a trainer needs but a serving node does not (online-EWC importances and anchors): not downloaded.
TRAINING_ONLY = frozenset({"fisher.safetensors"})


def serving_files(files: dict[str, str]) -> dict[str, str]:
    """The part of a release's ``files`` (name -> sha256) a serving node downloads and verifies."""
    return {name: digest for name, digest in files.items() if name not in TRAINING_ONLY and name != "manifest.json"}
