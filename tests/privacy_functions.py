"""User functions as `privacy.function` names them (``tests.privacy_functions:redact_names``): one that
works and the ways one can fail."""

from __future__ import annotations

import re

NOT_CALLABLE = 42


def redact_names(text: str) -> str:
    return re.sub(r"\b(Alice|Bob)\b", "[name]", text)


def explode(text: str) -> str:
    raise RuntimeError(f"cannot handle {text}")  # the text must not reach the DLQ message


def not_a_string(text: str) -> int:
    return len(text)
