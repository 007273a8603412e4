"""Model lines: which lines an engine serves and the effective settings of each (pure, no I/O).

With no ``models:`` entries the only line is ``model.name`` (the single-line shorthand of every configuration
before lines existed). Each ``models:`` entry names one line (``name``) or every line whose name matches a
shell-style pattern (``pattern: tenant-*``, matched case-sensitively); an explicit name wins over patterns, and
of several patterns the first listed wins. An entry's ``base``/``quantization`` replace ``model.*``; its
``window``, ``lora``, ``training``, ``ewc``, ``learning`` and ``rollout`` mappings override the top-level
sections field by field (nested sections too): what an entry does not set comes from the top level.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ValidationError

from streamengine.config.settings import LINE_SECTIONS, LineSettings, Settings
from streamengine.errors import ConfigError

_NAME_CACHE_MAX = 65_536
"""Most names a :class:`Lines` remembers the entry of (a flood of distinct unknown names cannot grow it further)."""


def _invalid_name(name: str) -> bool:
    """Not a usable line name: empty, or not a folder path of object storage (``store.folders.check_model``)."""
    parts = name.split("/")
    return not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        merged[key] = _merged(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return merged


def _label(index: int, entry: LineSettings) -> str:
    return f"models[{index}] ({entry.name or entry.pattern})"


def effective(settings: Settings, entry: LineSettings, name: str, label: str = "") -> Settings:
    """The settings of line ``name`` under ``entry``: model.name/base and the overridden sections replaced.
    A section the overrides make invalid is a :class:`ConfigError` naming ``label`` and the field."""
    model = settings.model.model_copy(
        update={
            "name": name,
            "base": settings.model.base if entry.base is None else entry.base,
            "quantization": entry.quantization or settings.model.quantization,
        }
    )
    update: dict[str, Any] = {"model": model}
    for section in LINE_SECTIONS:
        override = getattr(entry, section)
        if not override:
            continue
        current: BaseModel = getattr(settings, section)
        kind = type(current)
        try:
            update[section] = kind.model_validate(_merged(current.model_dump(by_alias=True), override))
        except ValidationError as exc:
            problems = "; ".join(
                f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else
                f"{section}: {err['msg']}"
                for err in exc.errors()
            )  # fmt: skip
            raise ConfigError(f"{label or _label(0, entry)}: {problems}") from None
    return settings.model_copy(update=update)


class Lines:
    """The lines of one engine's settings, with the entry (and effective settings) of each name remembered: the
    cost of a lookup does not grow with the number of entries once a name has been seen."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.named: dict[str, tuple[int, LineSettings]] = {}
        self.patterns: list[tuple[int, LineSettings]] = []
        for index, entry in enumerate(settings.models):
            if entry.name is not None:
                self.named[entry.name] = (index, entry)
            else:
                self.patterns.append((index, entry))
        self._entries: dict[str, tuple[int, LineSettings] | None] = {}
        self._effective: dict[str, Settings] = {}

    def names(self) -> list[str]:
        """The lines named explicitly (``model.name`` when there are no ``models:`` entries)."""
        return list(self.named) if self.settings.models else [self.settings.model.name]

    def entry(self, name: str) -> tuple[int, LineSettings] | None:
        """The entry (and its index) that line ``name`` falls under; None when no name or pattern matches."""
        try:
            return self._entries[name]
        except KeyError:
            pass
        found = self._find(name)
        if len(self._entries) >= _NAME_CACHE_MAX:
            self._entries.clear()
        self._entries[name] = found
        return found

    def _find(self, name: str) -> tuple[int, LineSettings] | None:
        if not self.settings.models:
            return (0, LineSettings(name=name)) if name == self.settings.model.name else None
        if name in self.named:
            return self.named[name]
        if _invalid_name(name):
            return None
        for index, entry in self.patterns:
            if fnmatchcase(name, entry.pattern or ""):
                return index, entry
        return None

    def matches(self, name: str) -> bool:
        return self.entry(name) is not None

    def for_line(self, name: str) -> Settings:
        """The effective settings of line ``name`` (remembered: the same object for the same name)."""
        if (known := self._effective.get(name)) is not None:
            return known
        found = self.entry(name)
        if found is None:
            configured = ", ".join([*self.names(), *(e.pattern or "" for _, e in self.patterns)])
            raise ConfigError(f"model line '{name[:100]}' matches no configured line ({configured})")
        index, entry = found
        result = effective(self.settings, entry, name, _label(index, entry)) if self.settings.models else self.settings
        if len(self._effective) >= _NAME_CACHE_MAX:
            self._effective.clear()
        self._effective[name] = result
        return result


def line_names(settings: Settings) -> list[str]:
    """The lines ``settings`` names explicitly (patterns are not expanded): ``model.name`` without ``models:``."""
    return Lines(settings).names()


def matches(settings: Settings, name: str) -> bool:
    """Line ``name`` is served here: ``model.name`` without ``models:``, else a listed name or a pattern's match."""
    return Lines(settings).matches(name)


def for_line(settings: Settings, name: str) -> Settings:
    """The effective settings of line ``name``; a :class:`ConfigError` naming it when nothing matches."""
    return Lines(settings).for_line(name)


def check(settings: Settings) -> None:
    """Every entry's overrides give valid settings (each entry's own name, or its pattern as a stand-in)."""
    for index, entry in enumerate(settings.models):
        effective(settings, entry, entry.name or entry.pattern or "", _label(index, entry))
