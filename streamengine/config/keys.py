"""The release signing keys the settings name, read and parsed: a :class:`Signer` for the engine, a
:class:`Verifier` for serving nodes. A missing or malformed key file is a ConfigError naming its setting.
:func:`ensure_key_pair` makes an Ed25519 pair (what ``openssl genpkey -algorithm ed25519`` would)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from streamengine.config.settings import Settings
from streamengine.core.manifest import Signer, Verifier, new_key_pair, private_key_from_pem, public_key_from_pem
from streamengine.errors import ConfigError

K = TypeVar("K")


def _read_key(path: Path, setting: str, env: str, parse: Callable[[bytes], K]) -> K:
    try:
        return parse(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{setting} ({env}): cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{setting} ({env}): {path} holds no usable key: {exc}") from None


def _hmac_key(settings: Settings) -> str | None:
    key = settings.signing_key
    return (key.get_secret_value() or None) if key is not None else None  # an empty key is no key


def release_signer(settings: Settings) -> Signer | None:
    """What the engine signs releases with (None: releases go out unsigned)."""
    hmac_key = _hmac_key(settings)
    path = settings.signing.private_key_file
    private = (
        _read_key(path, "signing.private_key_file", "STREAMENGINE_SIGNING__PRIVATE_KEY_FILE", private_key_from_pem)
        if path
        else None
    )
    return Signer(hmac_key, private) if hmac_key or private else None


def release_verifier(settings: Settings) -> Verifier:
    """What a serving node checks releases with; ConfigError when ``serving.require_signature`` has no key."""
    hmac_key = _hmac_key(settings)
    path = settings.serving.public_key_file
    public = (
        _read_key(path, "serving.public_key_file", "STREAMENGINE_SERVING__PUBLIC_KEY_FILE", public_key_from_pem)
        if path
        else None
    )
    verifier = Verifier(hmac_key, public)
    if settings.serving.require_signature and not verifier.configured:
        raise ConfigError(
            "serving.require_signature (STREAMENGINE_SERVING__REQUIRE_SIGNATURE) is true but there is no key to "
            "check releases with: set serving.public_key_file (Ed25519) or signing_key (HMAC)"
        )
    return verifier


def ensure_key_pair(folder: Path) -> tuple[Path, Path]:
    """``folder``/release.key (owner-only) and release.pub: an Ed25519 pair, made unless already there."""
    private, public = folder / "release.key", folder / "release.pub"
    if not (private.is_file() and public.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        private_pem, public_pem = new_key_pair()
        private.touch(mode=0o600)
        private.write_bytes(private_pem)
        public.write_bytes(public_pem)
    return private, public
