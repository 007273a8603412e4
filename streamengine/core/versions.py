"""Adapter version numbers ``v<major>.<minor>`` (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from streamengine.errors import ConfigError

_VERSION = re.compile(r"v(\d+)\.(\d+)", re.ASCII)


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> Version:
        match = _VERSION.fullmatch(text)
        if not match:
            raise ConfigError(f"{text!r} is not a version (expected v<major>.<minor>, e.g. v1.0)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return (self.major, self.minor) < (other.major, other.minor)


FIRST = Version(1, 0)


def next_version(existing: list[str], major: bool = False) -> Version:
    """The version after the highest of ``existing``: minor bump, or major bump (``vN+1.0``)."""
    if not existing:
        return FIRST
    top = max(Version.parse(v) for v in existing)
    return Version(top.major + 1, 0) if major else Version(top.major, top.minor + 1)


def base_changed(production_base: str | None, configured_base: str) -> bool:
    """True when the configured base model differs from the one production's adapter was trained on.

    An adapter is tied to the base weights it was trained on, so a new base starts a new major line
    (``vN+1.0``) and trains from scratch rather than on top of the old line's adapter. No production
    version yet (``None``) or no recorded base (``""``) is not a change.
    """
    if not production_base or not configured_base:
        return False
    return _normalise(production_base) != _normalise(configured_base)


def _normalise(base: str) -> str:
    return base.strip().rstrip("/")
