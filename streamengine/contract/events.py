"""The public event contract: FeedbackEvent v1 (input) and AdapterReleased v1 (output).

These pydantic models are the source of ``schemas/*.json`` (``streamengine schemas --write``); a test
fails when the files drift from them.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypedDict, cast

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from streamengine.errors import EventRejected

MAX_WEIGHT = 1_000_000.0
"""Largest client ``weight``: sums of many samples stay finite in PostgreSQL (a float8 overflow is an error)."""
FEEDBACK_TYPE = "io.streamengine.feedback.v1"
RELEASED_TYPE = "io.streamengine.adapter.released.v1"
CANARY_TYPE = "io.streamengine.adapter.canary.v1"
STATUS_TYPE = "io.streamengine.adapter.status.v1"


class FeedbackKind(StrEnum):
    THUMBS_UP = "thumbs_up"
    THUMBS_DOWN = "thumbs_down"
    RATING = "rating"
    CORRECTION = "correction"


def _unstorable(value: Any) -> str | None:
    """Why a JSON value cannot be stored as PostgreSQL jsonb (NaN/Infinity, U+0000 in a string or key), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "contains a NUL character (\\u0000)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"contains the number {item}, which JSON cannot hold"
        elif isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return None


def _missing_for_kind(kind: FeedbackKind, rating: int | None, correction: str | None) -> str | None:
    """What an event of ``kind`` lacks, or None."""
    if kind is FeedbackKind.RATING and rating is None:
        return "kind 'rating' needs a 'rating' field (1-5)"
    if kind is FeedbackKind.CORRECTION and not correction:
        return "kind 'correction' needs a non-empty 'correction' field"
    return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str

    @model_validator(mode="after")
    def _storable_extra(self) -> ChatMessage:
        """Extra message fields are stored with the prompt (jsonb): refuse what PostgreSQL would refuse."""
        if self.model_extra and (why := _unstorable(self.model_extra)):
            raise ValueError(f"an extra field of a message {why}")
        return self


class FeedbackEvent(BaseModel):
    """One piece of user feedback on one model answer. Unknown fields are kept but ignored."""

    model_config = ConfigDict(extra="allow", title="FeedbackEvent v1")

    event_id: str = Field(min_length=1, max_length=256, description="Unique; duplicates are dropped.")
    model: str = Field(min_length=1, max_length=256, description="The model line whose adapter learns.")
    prompt: str | list[ChatMessage] = Field(description="A string, or a chat `messages` list.")
    response: str = Field(description="What the model answered.")
    kind: FeedbackKind
    rating: int | None = Field(None, ge=1, le=5, description="1-5, required for kind `rating`.")
    correction: str | None = Field(None, description="The better answer, required for `correction`.")
    weight: float | None = Field(None, gt=0, le=MAX_WEIGHT, description="Optional positive multiplier (at most 1e6).")
    user_id: str | None = Field(None, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    adapter_version: str | None = Field(None, max_length=64, description="The adapter that answered.")
    timestamp: datetime | None = Field(None, description="RFC 3339.")

    @field_validator("rating", "weight", mode="before")
    @classmethod
    def _json_number(cls, value: Any) -> Any:
        # As the JSON Schema says: a number, not a boolean or a numeric string (lax mode took both).
        if isinstance(value, bool | str):
            raise ValueError("must be a JSON number")
        return value

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("weight must be a finite number")
        return value

    @field_validator("timestamp")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        # Stored as timestamptz and read back as a Python datetime: the instant must exist in UTC in years
        # 1-9999 (a naive time is the local time, as the store reads it).
        if value is not None:
            try:
                value.astimezone(UTC)
            except (OverflowError, ValueError):
                raise ValueError("timestamp is out of range (years 1-9999 in UTC)") from None
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value: str | list[ChatMessage]) -> str | list[ChatMessage]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt messages list is empty")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> FeedbackEvent:
        if missing := _missing_for_kind(self.kind, self.rating, self.correction):
            raise ValueError(missing)
        return self

    @model_validator(mode="after")
    def _no_nul(self) -> FeedbackEvent:
        """PostgreSQL text cannot hold U+0000: refuse it here (DLQ) rather than fail the batch write."""
        texts = [self.event_id, self.model, self.response, self.correction, self.user_id, self.session_id,
                 self.adapter_version]  # fmt: skip
        if isinstance(self.prompt, str):
            texts.append(self.prompt)
        else:
            texts += [text for m in self.prompt for text in (m.role, m.content)]
        if any(text and "\x00" in text for text in texts):
            raise ValueError("a text field contains a NUL character (\\u0000), which cannot be stored")
        return self


class LoraSpec(BaseModel):
    r: int
    alpha: int
    target_modules: list[str]


class WindowSpec(BaseModel):
    id: int
    samples: int
    weight: float
    first_offsets: dict[str, int] = Field(default_factory=dict, description="partition -> offset")
    last_offsets: dict[str, int] = Field(default_factory=dict, description="partition -> offset")
    start: datetime | None = None
    end: datetime | None = None


ReleaseReason = Literal["threshold", "schedule", "manual", "rollback"]


class AdapterReleased(BaseModel):
    """The version every serving node of ``model`` must run (the latest record per key wins)."""

    model_config = ConfigDict(extra="allow", title="AdapterReleased v1")

    event_id: str
    model: str
    version: str = Field(pattern=r"^v\d+\.\d+$")
    parent_version: str | None = None
    base_model: str
    uri: str = Field(description="s3://<bucket>/<model>/<version>/, the adapter folder.")
    files: dict[str, str] = Field(description="file name -> sha256 hex")
    file_sizes: dict[str, NonNegativeInt] | None = Field(
        None, description="file name -> size in bytes; a node stops a download as soon as a file exceeds it."
    )
    size_bytes: int = Field(ge=0)
    lora: LoraSpec
    ewc_lambda: float
    window: WindowSpec | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)
    reason: ReleaseReason
    created_at: datetime
    sequence: int | None = Field(
        None,
        ge=1,
        description="Number of this announcement in its model line, given by the registry (releases, deploys and "
        "rollbacks alike) and signed: a node refuses a record older than the one it serves.",
    )
    signature: str | None = Field(
        None, description="HMAC-SHA256 (hex) of the canonical record: every field but `event_id` and `signature`."
    )
    signature_ed25519: str | None = Field(
        None,
        description="Ed25519 signature (hex) of the canonical record without `event_id`, `signature` and itself; "
        "nodes verify it with the public key.",
    )


class AdapterCanary(AdapterReleased):
    """A version on trial on some serving nodes of ``model`` (topic ``adapter.canary``, latest record per key wins).

    Only nodes that take part in canaries read this topic, so a node that knows nothing of canaries keeps
    running the production version of ``adapter.released``. While ``stage`` is ``canary``, the nodes named in
    ``canary_nodes`` run this version; a record with ``stage`` ``ended`` (the canary was promoted, rolled back
    or aborted: ``outcome``) sends them back to ``adapter.released``. Signed like a release (every field but
    ``event_id`` and the signatures), with a ``sequence`` from the same per-line counter."""

    model_config = ConfigDict(extra="allow", title="AdapterCanary v1")

    stage: Literal["canary", "ended"]
    canary_nodes: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        description="Node ids (serving.node_id) that run this version while the stage is canary."
    )
    production_version: str | None = Field(None, description="The version the rest of the fleet runs.")
    outcome: Literal["promoted", "rolled_back", "aborted"] | None = Field(
        None, description="How the canary ended (stage ended only)."
    )


class NodeState(StrEnum):
    DOWNLOADING = "downloading"
    SERVING = "serving"
    FAILED = "failed"


class NodeStatus(BaseModel):
    """What one serving node runs for one model line (topic ``adapter.status``, key ``<model>/<node_id>``,
    compacted): published on every change and every ``serving.status_interval_s`` as a heartbeat."""

    model_config = ConfigDict(extra="allow", title="NodeStatus v1")

    node_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
    model: str = Field(min_length=1, max_length=128)
    version: str | None = Field(None, pattern=r"^v\d+\.\d+$", description="What it serves (None: nothing yet).")
    stage: Literal["production", "canary"] = Field(description="Which announcement it follows now.")
    canary: bool = Field(
        True,
        description="Takes part in canaries (serving.canary): the engine names canary nodes only among these.",
    )
    state: NodeState
    target_version: str | None = Field(
        None, pattern=r"^v\d+\.\d+$", description="The version it is downloading or failed to load."
    )
    reason: str | None = Field(None, max_length=1000, description="Why it failed (state failed).")
    swapped_at: datetime | None = Field(None, description="When it began serving ``version``.")
    heartbeat_at: datetime


def status_key(model: str, node_id: str) -> str:
    """The ``adapter.status`` record key of one node of one line."""
    return f"{model}/{node_id}"


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode_feedback(raw: bytes | None, max_bytes: int) -> FeedbackEvent:
    """Parse one record's value, or raise :class:`EventRejected` saying why (the DLQ's headers)."""
    if raw is None:
        raise EventRejected("empty", "record has no value")
    if len(raw) > max_bytes:
        raise EventRejected("too_large", f"record is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventRejected("invalid_utf8", f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return FeedbackEvent.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise EventRejected("invalid_json", f"value is not valid JSON: {_summarise(exc)}") from None
        if any(e["type"] == "model_type" for e in exc.errors()):
            raise EventRejected("schema", "value is not a JSON object") from None
        raise EventRejected("schema", _summarise(exc)) from None
    except (RecursionError, ValueError) as exc:
        raise EventRejected("invalid_json", f"value cannot be parsed: {type(exc).__name__}") from None


# --- ingest's decoder: the common record in one pass of msgspec's C decoder --------------------------------


class Message(TypedDict):
    """A chat message as stored with the prompt: ``role``, ``content`` and any extra fields."""

    role: str
    content: str


class Feedback(msgspec.Struct, frozen=True, gc=False):
    """A valid FeedbackEvent v1 as ingest uses it: the prompt as its JSON value (messages as dicts, their extra
    fields kept), unknown top-level fields dropped. :func:`decode_fields` makes it from a record's value."""

    event_id: str
    model: str
    prompt: str | list[Message]
    response: str
    kind: FeedbackKind
    rating: int | None = None
    correction: str | None = None
    weight: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    adapter_version: str | None = None
    timestamp: datetime | None = None

    @classmethod
    def of(cls, event: FeedbackEvent) -> Feedback:
        prompt: str | list[Message]
        if isinstance(event.prompt, str):
            prompt = event.prompt
        else:  # what model_dump() gives (fields, then extra fields), at a fifth of its cost
            prompt = [
                cast(Message, {"role": m.role, "content": m.content, **(m.model_extra or {})}) for m in event.prompt
            ]
        return cls(
            event.event_id, event.model, prompt, event.response, event.kind, event.rating, event.correction,
            event.weight, event.user_id, event.session_id, event.adapter_version, event.timestamp,
        )  # fmt: skip


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Id = Annotated[str, msgspec.Meta(max_length=256)]
_Version = Annotated[str, msgspec.Meta(max_length=64)]


class _Wire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """FeedbackEvent's fields and constraints as msgspec checks them in C. It accepts a subset of what
    :class:`FeedbackEvent` accepts (``tests/test_events.py`` compares the two on hostile input): numbers must
    be JSON numbers of their type (a rating of ``5.0`` takes the model's path), NaN and Infinity are not JSON
    here, messages are plain ``{role, content}`` objects, and :func:`_fast` checks the rest."""

    event_id: _Name
    model: _Name
    prompt: str | Annotated[list[dict[str, str]], msgspec.Meta(min_length=1)]
    response: str
    kind: FeedbackKind
    rating: Annotated[int, msgspec.Meta(ge=1, le=5)] | None = None
    correction: str | None = None
    weight: Annotated[float, msgspec.Meta(gt=0, le=MAX_WEIGHT)] | None = None
    user_id: _Id | None = None
    session_id: _Id | None = None
    adapter_version: _Version | None = None
    timestamp: str | None = None


class _OpenWire(_Wire, forbid_unknown_fields=False):
    """:class:`_Wire` for a record with unknown fields (ignored)."""


_WIRE = msgspec.json.Decoder(_Wire)
_OPEN_WIRE = msgspec.json.Decoder(_OpenWire)
_DATETIME = TypeAdapter(datetime).validator
"""pydantic's own datetime parsing (what FeedbackEvent does with a JSON string), so both paths agree."""
MAX_FAST_NESTING = 100
"""Records with unknown fields that open more arrays and objects than this take the model's path (pydantic
refuses JSON nested deeper than 200 levels, msgspec does not; the known fields nest 3 deep at most)."""


def _decode_wire(raw: bytes) -> _Wire | None:
    try:
        return _WIRE.decode(raw)
    except msgspec.DecodeError:
        pass
    if raw.count(b"[") + raw.count(b"{") > MAX_FAST_NESTING:
        return None
    try:
        return _OPEN_WIRE.decode(raw)
    except msgspec.DecodeError:
        return None


def _fast(raw: bytes) -> Feedback | None:
    """The record as a :class:`Feedback` when it is plainly valid, else None (then the model says why)."""
    wire = _decode_wire(raw)
    if wire is None:
        return None
    if _missing_for_kind(wire.kind, wire.rating, wire.correction):
        return None
    if b"\\" in raw and b"\\u0000" in raw:  # a NUL character may be escaped there (JSON has no other way to hold one)
        return None
    prompt = wire.prompt
    if not isinstance(prompt, str) and not all(len(m) == 2 and m.get("role") and "content" in m for m in prompt):
        return None  # a message without a role or content, or with extra fields
    when = None
    if wire.timestamp is not None:
        try:
            when = _DATETIME.validate_python(wire.timestamp)
        except ValidationError:
            return None
        if not 1 < when.year < 9999:  # near the ends of the range an offset may leave years 1-9999 in UTC
            return None
    return Feedback(
        wire.event_id, wire.model, cast(str | list[Message], prompt), wire.response, wire.kind, wire.rating,
        wire.correction, wire.weight, wire.user_id, wire.session_id, wire.adapter_version, when,
    )  # fmt: skip


class _Prompt(msgspec.Struct, gc=False):
    """A record's prompt as raw JSON, every other field skipped unbuilt."""

    prompt: msgspec.Raw = msgspec.Raw(b"")


_PROMPT = msgspec.json.Decoder(_Prompt)
_RAW_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def _message_count(raw: bytes) -> int:
    """How many items a record's prompt list holds (0 for a string prompt or a record that does not parse),
    counted without building them."""
    try:
        prompt = _PROMPT.decode(raw).prompt
        return len(_RAW_ITEMS.decode(prompt)) if memoryview(prompt)[:1] == b"[" else 0
    except (msgspec.DecodeError, RecursionError):  # FeedbackEvent says what is wrong with it
        return 0


def _too_many(count: int, limit: int) -> EventRejected:
    return EventRejected("too_long", f"prompt has {count} messages, over samples.max_messages ({limit})")


def decode_fields(raw: bytes | None, max_bytes: int, max_messages: int | None = None) -> Feedback:
    """:func:`decode_feedback` as ingest calls it: the same accepted records, values and rejections, the common
    record decoded and validated in one pass in C; anything else goes through :class:`FeedbackEvent`.

    ``max_messages``: a prompt with more chat messages is rejected (``too_long``) whatever else is wrong with
    the record, before pydantic's model would build every message."""
    if raw is not None and len(raw) <= max_bytes and (raw.isascii() or _is_utf8(raw)):
        fields = _fast(raw)
        if fields is not None:
            if max_messages is not None and not isinstance(fields.prompt, str) and len(fields.prompt) > max_messages:
                raise _too_many(len(fields.prompt), max_messages)
            return fields
        if max_messages is not None and (count := _message_count(raw)) > max_messages:
            raise _too_many(count, max_messages)
    return Feedback.of(decode_feedback(raw, max_bytes))


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of each public event."""
    return {
        "feedback-event.v1.json": FeedbackEvent.model_json_schema(),
        "adapter-released.v1.json": AdapterReleased.model_json_schema(),
        "adapter-canary.v1.json": AdapterCanary.model_json_schema(),
        "adapter-status.v1.json": NodeStatus.model_json_schema(),
    }
