"""Adapter manifests: canonical form, file hashes and release signatures (pure).

A release record carries up to two signatures of its canonical form (sorted keys, no spaces, UTF-8):

- ``signature``: HMAC-SHA256 with a key shared by the engine and the nodes (``signing_key``). It covers
  every field but ``event_id`` and itself, as in v1, so subscribers of any version check it.
- ``signature_ed25519``: Ed25519 with the engine's private key; nodes hold the public key, which cannot
  sign. It covers every field but ``event_id`` and the two signatures, and is made first, so the HMAC
  covers it too.

Both cover ``sequence``, the registry's number of each announcement in its model line, which is what
lets a node refuse a replayed older record whatever its ``event_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

SIGNATURE_FIELDS = ("signature", "signature_ed25519")
SIGNED_FIELDS_EXCLUDE = frozenset({"signature", "event_id"})
ED25519_EXCLUDE = SIGNED_FIELDS_EXCLUDE | {"signature_ed25519"}
ALLOWED_SUFFIXES = (".json", ".jsonl", ".safetensors", ".txt", ".md", ".jinja", ".model")


def canonical_bytes(manifest: dict[str, Any], exclude: frozenset[str] = SIGNED_FIELDS_EXCLUDE) -> bytes:
    """Sorted keys, no spaces, UTF-8, without the ``exclude`` fields (by default ``signature``, ``event_id``)."""
    body = {k: v for k, v in manifest.items() if k not in exclude}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def sign(manifest: dict[str, Any], key: str) -> str:
    """The HMAC-SHA256 ``signature`` (hex)."""
    return hmac.new(key.encode(), canonical_bytes(manifest), hashlib.sha256).hexdigest()


def signature_valid(manifest: dict[str, Any], key: str) -> bool:
    given = manifest.get("signature")
    return isinstance(given, str) and hmac.compare_digest(given, sign(manifest, key))


def ed25519_valid(manifest: dict[str, Any], key: Ed25519PublicKey) -> bool:
    given = manifest.get("signature_ed25519")
    try:
        key.verify(bytes.fromhex(given), canonical_bytes(manifest, ED25519_EXCLUDE))  # type: ignore[arg-type]
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as PEM: (private, as PKCS#8; public, as SubjectPublicKeyInfo)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (``openssl genpkey -algorithm ed25519``); ValueError otherwise."""
    key = load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def public_key_from_pem(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (``openssl pkey -pubout``); ValueError otherwise."""
    key = load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


@dataclass(frozen=True, slots=True)
class Signer:
    """What the engine signs releases with: an HMAC key, an Ed25519 private key, or both."""

    hmac_key: str | None = None
    private_key: Ed25519PrivateKey | None = None

    def signatures(self, manifest: dict[str, Any]) -> dict[str, str | None]:
        """The signature fields for ``manifest`` (Ed25519 first: the HMAC covers it)."""
        body = canonical_bytes(manifest, ED25519_EXCLUDE)
        ed25519 = self.private_key.sign(body).hex() if self.private_key else None
        mac = sign({**manifest, "signature_ed25519": ed25519}, self.hmac_key) if self.hmac_key else None
        return {"signature_ed25519": ed25519, "signature": mac}


@dataclass(frozen=True, slots=True)
class Verifier:
    """What a serving node checks releases with; with neither key it accepts unsigned ones."""

    hmac_key: str | None = None
    public_key: Ed25519PublicKey | None = None

    @property
    def configured(self) -> bool:
        return self.hmac_key is not None or self.public_key is not None

    def problem(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` (its JSON) is not signed as this node requires, or None. Every signature the node
        holds a key for must be right, and at least one must be there."""
        checked = False
        if self.public_key is not None and record.get("signature_ed25519") is not None:
            if not ed25519_valid(record, self.public_key):
                return "has a wrong Ed25519 signature"
            checked = True
        if self.hmac_key is not None and record.get("signature") is not None:
            if not signature_valid(record, self.hmac_key):
                return "has a wrong signature"
            checked = True
        if checked or not self.configured:
            return None
        if any(record.get(name) is not None for name in SIGNATURE_FIELDS):
            held = "an Ed25519 public key" if self.public_key is not None else "an HMAC key"
            return f"is not signed with a kind of key this node holds ({held})"
        return "is unsigned and this node requires a signature"


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
