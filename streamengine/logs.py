"""Logging of the `streamengine` processes: one line format, and configured secrets never written.

The CLI sets logging up before a command runs (:func:`configure`) and hands over the settings' secrets once
they are loaded (:data:`HIDDEN`). Every formatted line (message, arguments, traceback) then has those values,
as written and URL-encoded, replaced by ``***`` (the CLI's one-line error gets the same treatment). This is the
second line of defence: the code itself keeps secrets out of its messages (tests/test_secrets.py greps for them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from streamengine.core.masking import MASK, secret_forms

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("aiokafka", "faust", "mode", "httpx", "httpcore", "urllib3", "uvicorn.error")
"""Libraries kept at WARNING and above whatever the level asked for (their DEBUG lines flood)."""
OPTIONAL_NOTICES = ("bitsandbytes",)
"""Libraries whose warnings are about optional packages streamengine does not use (bitsandbytes asks for
``kernels``): kept off a quiet console, still written to the log file."""
CONSOLE = "streamengine-console"


class Hidden:
    """Values never to write (the settings' secrets)."""

    def __init__(self) -> None:
        self._values: list[str] = []
        self._forms: list[str] = []

    def add(self, values: Iterable[str]) -> None:
        self._values = list(dict.fromkeys([*self._values, *values]))
        self._forms = secret_forms(self._values)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text


HIDDEN = Hidden()


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines never hold a hidden value."""

    def __init__(self, fmt: str = FORMAT, hidden: Hidden = HIDDEN) -> None:
        super().__init__(fmt)
        self.hidden = hidden

    def format(self, record: logging.LogRecord) -> str:
        return self.hidden(super().format(record))


def configure(level: str) -> None:
    """Log to stderr at ``level`` through a :class:`RedactingFormatter` (like ``logging.basicConfig``: root
    handlers already there, e.g. pytest's, are left alone)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.set_name(CONSOLE)
        handler.setFormatter(RedactingFormatter())
        root.addHandler(handler)
        root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def _not_optional_notice(record: logging.LogRecord) -> bool:
    return record.levelno > logging.WARNING or record.name.partition(".")[0] not in OPTIONAL_NOTICES


def log_to_file(path: Path, quiet_console: bool) -> None:
    """Write the full log to ``path`` as well. With ``quiet_console``, the console handler :func:`configure`
    installed shows only warnings and errors, less :data:`OPTIONAL_NOTICES` (``streamengine up`` keeps the
    terminal for its own lines)."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(RedactingFormatter())
    root.addHandler(handler)
    if quiet_console:
        for console in root.handlers:
            if console.get_name() == CONSOLE:
                console.setLevel(logging.WARNING)
                console.addFilter(_not_optional_notice)
