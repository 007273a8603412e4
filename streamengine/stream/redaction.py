"""The ingest redactor from the ``privacy`` settings: imports ``privacy.function`` once, at start."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from streamengine.config.settings import PrivacySettings
from streamengine.core.redact import Redactor
from streamengine.errors import ConfigError

_SETTING = "privacy.function (STREAMENGINE_PRIVACY__FUNCTION)"


def load_function(spec: str) -> Callable[[str], str]:
    """``package.module:function`` -> the callable; a :class:`ConfigError` naming the setting otherwise."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while it was imported
        raise ConfigError(f"{_SETTING}: cannot import module '{module_name}': {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{_SETTING}: module '{module_name}' has no attribute '{attribute}'") from None
    if not callable(target):
        raise ConfigError(f"{_SETTING}: '{spec}' is a {type(target).__name__}, not a function (str -> str)")
    return target


def build_redactor(privacy: PrivacySettings) -> Redactor:
    """The redactor ingest applies to every event before its sample is stored."""
    function = load_function(privacy.function) if privacy.function else None
    return Redactor.build(privacy.redact, privacy.patterns, function)
