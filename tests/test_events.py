"""decode_feedback: what FeedbackEvent v1 accepts, and the DLQ error class of everything it rejects."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamengine.contract.events import ChatMessage, FeedbackEvent, FeedbackKind, decode_feedback
from streamengine.errors import EventRejected

LIMIT = 1_048_576
VALID: dict[str, Any] = {"event_id": "e-1", "model": "m", "prompt": "2+2?", "response": "4", "kind": "thumbs_up"}


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def rejected(raw: bytes | None, max_bytes: int = LIMIT) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        decode_feedback(raw, max_bytes)
    return info.value


# --- accepted ----------------------------------------------------------------------------------------
def test_minimal_event() -> None:
    event = decode_feedback(encode(VALID), LIMIT)
    assert (event.event_id, event.model, event.prompt, event.response) == ("e-1", "m", "2+2?", "4")
    assert event.kind is FeedbackKind.THUMBS_UP
    assert (event.rating, event.correction, event.weight, event.user_id, event.timestamp) == (None,) * 5


def test_full_event_with_chat_messages() -> None:
    raw = encode(
        {
            **VALID,
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?", "name": "a"}],
            "kind": "rating",
            "rating": 5,
            "weight": 2,
            "user_id": "u",
            "session_id": "s",
            "adapter_version": "v1.4",
            "timestamp": "2024-05-06T07:08:09+02:00",
        }
    )
    event = decode_feedback(raw, LIMIT)
    assert isinstance(event.prompt, list) and all(isinstance(m, ChatMessage) for m in event.prompt)
    assert [(m.role, m.content) for m in event.prompt] == [("system", "Be brief."), ("user", "2+2?")]
    assert event.prompt[1].model_extra == {"name": "a"}
    assert (event.kind, event.rating, event.weight) == (FeedbackKind.RATING, 5, 2.0)
    assert (event.user_id, event.session_id, event.adapter_version) == ("u", "s", "v1.4")
    assert event.timestamp == datetime(2024, 5, 6, 5, 8, 9, tzinfo=UTC)


def test_correction_event() -> None:
    event = decode_feedback(encode({**VALID, "kind": "correction", "correction": "four"}), LIMIT)
    assert (event.kind, event.correction) == (FeedbackKind.CORRECTION, "four")


def test_unknown_fields_are_kept() -> None:
    event = decode_feedback(encode({**VALID, "trace": {"id": [1, 2]}, "source": "node-7"}), LIMIT)
    assert event.model_extra == {"trace": {"id": [1, 2]}, "source": "node-7"}


def test_unicode_and_exact_size_limit() -> None:
    raw = json.dumps({**VALID, "response": "vier \u2013 \u56db"}, ensure_ascii=False).encode()
    assert decode_feedback(raw, len(raw)).response == "vier \u2013 \u56db"


@pytest.mark.parametrize("rating", [1, 2, 3, 4, 5])
def test_every_rating_from_one_to_five(rating: int) -> None:
    assert decode_feedback(encode({**VALID, "kind": "rating", "rating": rating}), LIMIT).rating == rating


# --- rejected ----------------------------------------------------------------------------------------
def test_none_is_empty() -> None:
    error = rejected(None)
    assert (error.error_class, str(error)) == ("empty", "record has no value")


def test_too_large_is_checked_first() -> None:
    raw = encode(VALID)
    error = rejected(raw, len(raw) - 1)
    assert error.error_class == "too_large"
    assert str(error) == f"record is {len(raw)} bytes, over the {len(raw) - 1}-byte limit"
    assert rejected(b"\xff" * 101, 100).error_class == "too_large"


def test_invalid_utf8() -> None:
    raw = encode(VALID).replace(b"2+2?", b"2+2\xff")
    bad_at = raw.index(b"\xff")
    error = rejected(raw)
    assert error.error_class == "invalid_utf8"
    assert str(error) == f"value is not UTF-8: invalid start byte at byte {bad_at}"
    assert rejected(b"\xed\xa0\x80").error_class == "invalid_utf8"  # an encoded surrogate


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b'{"event_id": "e"', b"{'a': 1}", b"\xef\xbb\xbf{}"])
def test_invalid_json(raw: bytes) -> None:
    assert rejected(raw).error_class == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b"null", b'"text"', b"42", b"true"])
def test_json_that_is_not_an_object(raw: bytes) -> None:
    error = rejected(raw)
    assert (error.error_class, str(error)) == ("schema", "value is not a JSON object")


@pytest.mark.parametrize("field", ["event_id", "model", "prompt", "response", "kind"])
def test_missing_required_field(field: str) -> None:
    error = rejected(encode({k: v for k, v in VALID.items() if k != field}))
    assert error.error_class == "schema"
    assert str(error) == f"{field}: Field required"


SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("event_id as number", {"event_id": 7}, "event_id"),
    ("empty event_id", {"event_id": ""}, "event_id"),
    ("empty model", {"model": ""}, "model"),
    ("response as number", {"response": 4}, "response"),
    ("response null", {"response": None}, "response"),
    ("prompt as number", {"prompt": 3}, "prompt"),
    ("prompt as object", {"prompt": {"role": "user"}}, "prompt"),
    ("empty messages", {"prompt": []}, "prompt"),
    ("message without content", {"prompt": [{"role": "user"}]}, "prompt"),
    ("message with empty role", {"prompt": [{"role": "", "content": "x"}]}, "prompt"),
    ("unknown kind", {"kind": "love"}, "kind"),
    ("kind in capitals", {"kind": "THUMBS_UP"}, "kind"),
    ("rating 0", {"kind": "rating", "rating": 0}, "rating"),
    ("rating 6", {"kind": "rating", "rating": 6}, "rating"),
    ("rating -1", {"kind": "rating", "rating": -1}, "rating"),
    ("rating fractional", {"kind": "rating", "rating": 4.5}, "rating"),
    ("rating as string", {"kind": "rating", "rating": "5"}, "rating"),
    ("rating as boolean", {"kind": "rating", "rating": True}, "rating"),
    ("rating kind without rating", {"kind": "rating"}, "kind 'rating' needs a 'rating'"),
    ("rating kind with null rating", {"kind": "rating", "rating": None}, "kind 'rating' needs a 'rating'"),
    ("correction kind without correction", {"kind": "correction"}, "kind 'correction' needs"),
    ("correction kind with empty correction", {"kind": "correction", "correction": ""}, "kind 'correction' needs"),
    ("weight 0", {"weight": 0}, "weight"),
    ("weight negative", {"weight": -1.5}, "weight"),
    ("weight as string", {"weight": "2"}, "weight"),
    ("weight as boolean", {"weight": True}, "weight"),
    ("timestamp not a time", {"timestamp": "yesterday"}, "timestamp"),
    ("user_id too long", {"user_id": "u" * 257}, "user_id"),
]


@pytest.mark.parametrize(
    ("fields", "names"), [(f, n) for _, f, n in SCHEMA_ERRORS], ids=[i for i, _, _ in SCHEMA_ERRORS]
)
def test_schema_errors(fields: dict[str, Any], names: str) -> None:
    error = rejected(encode({**VALID, **fields}))
    assert error.error_class == "schema"
    assert names in str(error)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_weight_must_be_finite_and_positive(literal: bytes) -> None:
    raw = encode({**VALID, "weight": 12345}).replace(b"12345", literal)
    error = rejected(raw)
    assert error.error_class == "schema"
    assert str(error).startswith("weight: ")


def test_schema_message_lists_several_problems() -> None:
    error = rejected(encode({"event_id": "e", "model": "m", "prompt": 1, "response": "r", "kind": "x"}))
    message = str(error)
    assert error.error_class == "schema"
    assert "prompt" in message and "kind" in message and "; " in message


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        encode(VALID)[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        encode({**VALID, "prompt": "P"}).replace(b'"P"', b"[" * 50_000 + b"]" * 50_000),
    ],
    ids=["lists", "objects", "inside-valid-event", "as-prompt"],
)
def test_deep_nesting_is_rejected_cleanly(raw: bytes) -> None:
    error = rejected(raw)
    assert error.error_class == "invalid_json"
    assert str(error).startswith("value is not valid JSON")


def test_python_construction_still_works() -> None:
    event = FeedbackEvent(event_id="e", model="m", prompt="p", response="r", kind=FeedbackKind.RATING, rating=4)
    assert event.rating == 4


# --- property ----------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "event_id": json_values | st.text(max_size=5),
        "model": json_values | st.text(max_size=5),
        "prompt": json_values | st.text(max_size=5),
        "response": json_values | st.text(max_size=5),
        "kind": json_values | st.sampled_from([k.value for k in FeedbackKind]),
        "rating": json_values | st.integers(0, 6),
        "correction": json_values,
        "weight": json_values,
        "timestamp": json_values | st.just("2024-01-01T00:00:00Z"),
    },
)
records = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | event_like.map(lambda v: json.dumps(v).encode())
    | st.tuples(event_like, st.binary(max_size=8)).map(lambda t: json.dumps(t[0]).encode() + t[1])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=records)
def test_arbitrary_bytes_only_ever_raise_event_rejected(raw: bytes) -> None:
    try:
        event = decode_feedback(raw, 4096)
    except EventRejected as exc:
        assert exc.error_class in {"too_large", "invalid_utf8", "invalid_json", "schema"}
        assert str(exc)
    else:
        assert isinstance(event, FeedbackEvent)
        assert event.event_id and event.model


def test_nul_characters_are_rejected_not_stored() -> None:
    """PostgreSQL text cannot hold U+0000: such an event must go to the DLQ, not stall the batch write."""
    for field, value in [("response", "a\u0000b"), ("prompt", [{"role": "user", "content": "x\u0000"}]),
                         ("user_id", "\u0000")]:  # fmt: skip
        raw = json.dumps({"event_id": "n1", "model": "m", "prompt": "p", "response": "r", "kind": "thumbs_up",
                          field: value}).encode()  # fmt: skip
        with pytest.raises(EventRejected) as caught:
            decode_feedback(raw, 10_000)
        assert caught.value.error_class == "schema" and "NUL" in str(caught.value)
