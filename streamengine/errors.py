"""The one error hierarchy of streamengine.

Every error a user can meet derives from :class:`StreamEngineError`; the CLI prints its message as one
line and exits with its ``exit_code``. Messages name the bad field, setting or service and never carry
secrets.
"""

from __future__ import annotations

import re
from typing import Any


class StreamEngineError(Exception):
    """Base class: a failure with a message fit to show a user."""

    exit_code = 1


class ConfigError(StreamEngineError):
    """A setting is missing or invalid (the message names the setting and its environment variable)."""

    exit_code = 2


class ServiceUnavailable(StreamEngineError):
    """A dependency (Kafka, PostgreSQL, S3) cannot be reached."""

    exit_code = 3

    def __init__(self, service: str, target: str, detail: str) -> None:
        super().__init__(f"{service} at {target} is unreachable: {detail}")
        self.service = service
        self.target = target


class EventRejected(StreamEngineError):
    """A feedback record failed validation; it goes to the DLQ with ``error_class`` and the message."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class InvalidFeedback(EventRejected, ValueError):
    """A producer was given an event the engine would reject; nothing was sent. ``field`` names the first bad
    field (None when the fault is not one field's, such as a rating event without a rating)."""

    def __init__(self, error_class: str, message: str, field: str | None = None) -> None:
        super().__init__(error_class, message)
        self.field = field


class BufferFull(StreamEngineError):
    """A producer in non-blocking mode holds ``capacity`` records not yet acknowledged; the record was not taken."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"the producer's buffer holds {capacity} records not yet acknowledged by Kafka")
        self.capacity = capacity


class Undelivered(StreamEngineError):
    """Records Kafka did not acknowledge: refused for good by the broker (``reason`` ``refused``) or still
    unacknowledged when the producer closed (``closed``). ``records`` are the records themselves."""

    exit_code = 3

    def __init__(self, message: str, records: list[Any], reason: str = "closed") -> None:
        super().__init__(message)
        self.records = records
        self.reason = reason


class NotFound(StreamEngineError):
    """A model line, adapter version, alias or job does not exist."""

    exit_code = 4


class Conflict(StreamEngineError):
    """The request contradicts the current state (an empty window to close, a lost lease...)."""

    exit_code = 5


class IntegrityError(StreamEngineError):
    """An artifact failed verification: missing file, wrong sha256, bad signature, pickle file."""

    exit_code = 6


class TrainingError(StreamEngineError):
    """A training run failed (diverged, out of memory, crashed); the job records the reason."""

    exit_code = 7


TRANSIENT_DRIVERS = frozenset({"asyncpg", "aiokafka"})
"""Client libraries whose errors are a dependency's fault (down, restarting, failing over) until proven otherwise."""
DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54", "2F", "38", "39", "P0"})
"""SQLSTATE classes of a statement PostgreSQL refuses for the values it carries, whatever the moment: data
exceptions (string too long, invalid text or encoding, out of range), integrity constraints (check, not null,
foreign key), program limits (a value too large to index), and what functions and triggers raise."""
PERMANENT_SQLSTATE_CLASSES = DATA_SQLSTATE_CLASSES | {"0A", "21", "42", "44"}
"""Plus statements refused whatever they carry (syntax, undefined table, permission, unsupported feature): a
retry gives the same answer. Every other class (connection, resources, serialization failure, deadlock,
operator intervention, system error) may pass."""
RACE_SQLSTATES = frozenset({"23505"})
"""unique_violation: a row a concurrent transaction committed first, which a retry sees (and skips)."""


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error as asyncpg raises it; None for any other error."""
    if type(exc).__module__.split(".")[0] != "asyncpg":
        return None
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying with backoff: a connection or timeout failure, or an error of a database/broker driver
    that may pass (not a statement PostgreSQL refuses whatever the moment)."""
    if isinstance(exc, OSError | ConnectionError | TimeoutError | ServiceUnavailable):
        return True
    state = _sqlstate(exc)
    if state is not None:
        return state in RACE_SQLSTATES or state[:2] not in PERMANENT_SQLSTATE_CLASSES
    return type(exc).__module__.split(".")[0] in TRANSIENT_DRIVERS


def data_rejection(exc: BaseException) -> str | None:
    """When PostgreSQL refused a statement for the values it carries: the condition's name, prefixed
    ``database_`` (``database_check_violation``, ``database_string_data_right_truncation``); else None."""
    state = _sqlstate(exc)
    if state is None or state in RACE_SQLSTATES or state[:2] not in DATA_SQLSTATE_CLASSES:
        return None
    if getattr(type(exc), "sqlstate", None) != state:  # a code asyncpg has no class of its own for
        return f"database_{state}"
    name = type(exc).__name__.removesuffix("Error")
    return "database_" + re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
