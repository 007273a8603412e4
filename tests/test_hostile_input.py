"""Hostile records through ingest's classification, and every accepted one through real PostgreSQL.

Properties (hypothesis): classification never raises and never falls back to ``internal_error``; every
record it accepts is stored by the real batch write and reads back as it was classified (a record that
PostgreSQL would refuse must be rejected up front, or it would stall ingest in a retry loop); the size
limit holds to the byte. Plus the length limits of ``samples.*`` (reject / truncate) on the pure core.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_decoder import ACCEPTED, EITHER, Corpus, check, classifier, hostile_classes, main
from streamengine.config.settings import Settings, load_settings
from streamengine.contract import events as events_module
from streamengine.contract.events import Feedback, FeedbackEvent, decode_feedback, decode_fields
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.errors import EventRejected
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.stream.ingest import RawRecord
from tests.kafka_tools import DLQ_REASONS

MODEL = "tiny-llama"
SETTINGS = load_settings(
    kafka={"max_record_bytes": 16_384}, samples={"max_prompt_chars": 2_000, "max_completion_chars": 1_000}
)

# --- strategies --------------------------------------------------------------------------------------
hostile_text = st.text(
    st.characters(codec="utf-8") | st.sampled_from(["\x00", "\t", "\n", "\\", '"', "\u2028", "\ufeff", "😀"]),
    max_size=30,
)
hostile_numbers = (
    st.integers()
    | st.integers(min_value=10**18, max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([10**400, -(10**400), 1e308, 5e-324, -0.0])
)
json_values = st.recursive(
    st.none() | st.booleans() | hostile_numbers | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=15,
)
clean_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]) | clean_text, "content": clean_text},
        optional={"name": json_values, "meta": json_values},  # extra fields, stored with the prompt (jsonb)
    ),
    min_size=1,
    max_size=4,
)
KINDS = ["thumbs_up", "thumbs_down", "rating", "correction"]


def _complete(event: dict[str, Any]) -> dict[str, Any]:
    if event["kind"] == "rating":
        event.setdefault("rating", 3)
    if event["kind"] == "correction":
        event.setdefault("correction", "better")
    return event


valid_events = st.fixed_dictionaries(
    {
        "event_id": st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20),
        "model": st.just(MODEL),
        "prompt": clean_text | messages,
        "response": clean_text,
        "kind": st.sampled_from(KINDS),
    },
    optional={
        "rating": st.integers(1, 5),
        "correction": clean_text,
        "weight": st.floats(min_value=5e-324, max_value=1e6, exclude_min=False),
        "user_id": clean_text,
        "session_id": clean_text,
        "adapter_version": clean_text,
        "timestamp": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
        | st.sampled_from(["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-14:00", "2024-01-01T00:00:00Z"]),
        "trace": json_values,  # an unknown field: kept, ignored
    },
).map(_complete)
FIELDS = ["event_id", "model", "prompt", "response", "kind", "rating", "correction", "weight", "user_id",
          "session_id", "adapter_version", "timestamp"]  # fmt: skip
# Valid events with up to two fields replaced by anything (or removed), so that many reach PostgreSQL.
events = st.tuples(
    valid_events,
    st.lists(st.tuples(st.sampled_from(FIELDS), json_values | hostile_text | hostile_numbers | messages), max_size=2),
    st.lists(st.sampled_from(FIELDS), max_size=1),
).map(lambda t: {k: v for k, v in {**t[0], **dict(t[1])}.items() if k not in t[2]})


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode()


records = (
    st.binary(max_size=200)
    | json_values.map(_encode)
    | events.map(_encode)
    | st.tuples(events.map(_encode), st.binary(max_size=4)).map(lambda t: t[0] + t[1])
)


# --- classification never escapes --------------------------------------------------------------------
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=records | st.none())
def test_classify_only_ever_accepts_or_rejects_with_a_reason(raw: bytes | None) -> None:
    batch = classifier(SETTINGS).classify([RawRecord("t", 0, 0, None, raw, [])])
    assert len(batch) == 1
    for _, error in batch.bad:
        assert error.error_class in DLQ_REASONS, error  # never internal_error: an exception caught as a bug
        assert str(error)


@settings(max_examples=300, deadline=None)
@given(cls=st.sampled_from(list(Corpus().classes)), seed=st.integers(0, 2**32))
def test_every_hostile_class_is_rejected_and_every_valid_one_accepted(cls: str, seed: int) -> None:
    corpus = Corpus(seed=seed, model=MODEL, max_record_bytes=16_384, max_prompt_chars=2_000, max_completion_chars=1_000)
    case = corpus.make(cls)
    outcome, failure = check(classifier(SETTINGS), case, 0)
    assert failure is None, f"{cls}: {failure}"
    if cls in ACCEPTED:
        assert outcome == "accepted"
    elif cls not in EITHER:
        assert outcome in DLQ_REASONS


def test_hostile_classes_cover_the_brief() -> None:
    assert set(hostile_classes()) >= {
        "random_bytes", "invalid_utf8", "deep_nesting", "too_large", "wrong_type", "missing_field", "unknown_kind",
        "enormous_string", "bad_weight", "huge_int", "nul", "message_extra", "bad_timestamp", "empty",
    }  # fmt: skip


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("where", ["weight", "message extra", "nested message extra"])
def test_non_finite_numbers_are_rejected_wherever_they_would_be_stored(literal: str, where: str) -> None:
    event: dict[str, Any] = {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up"}
    if where == "weight":
        event["weight"] = "@@"
    else:
        meta = "@@" if where == "message extra" else {"scores": [1, {"x": "@@"}]}
        event["prompt"] = [{"role": "user", "content": "hi", "meta": meta}]
    raw = json.dumps(event).replace('"@@"', literal).encode()
    with pytest.raises(EventRejected) as info:
        decode_feedback(raw, 10_000)
    assert info.value.error_class == "schema"
    assert ("weight" in str(info.value)) if where == "weight" else ("extra field of a message" in str(info.value))


def test_weight_is_bounded_so_window_sums_stay_finite() -> None:
    base = {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up"}
    assert decode_feedback(json.dumps({**base, "weight": 1e6}).encode(), 10_000).weight == 1e6
    for weight in (1e6 + 1, 1e308, 10**40):
        with pytest.raises(EventRejected, match="weight"):
            decode_feedback(json.dumps({**base, "weight": weight}).encode(), 10_000)


@pytest.mark.parametrize(
    "timestamp", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "0001-01-01T05:00:00+05:00:01"]
)
def test_timestamps_outside_the_storable_range_are_rejected(timestamp: str) -> None:
    raw = json.dumps(
        {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up", "timestamp": timestamp}
    ).encode()
    with pytest.raises(EventRejected, match="timestamp") as info:
        decode_feedback(raw, 10_000)
    assert info.value.error_class == "schema"


def test_a_bug_in_validation_sends_the_record_to_the_dlq_not_the_consumer_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: the event -> sample step raising on one record (as a bug would) rejects that record only."""
    from streamengine.stream import ingest

    real = ingest.to_sample

    def buggy(event: FeedbackEvent, policy: SamplePolicy) -> Any:
        if event.event_id == "boom":
            raise RuntimeError("a bug")
        return real(event, policy)

    monkeypatch.setattr(ingest, "to_sample", buggy)
    base = {"model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up"}
    values = [json.dumps({**base, "event_id": name}).encode() for name in ("a", "boom", "b")]
    batch = classifier(SETTINGS).classify([RawRecord("t", 3, i, None, v, []) for i, v in enumerate(values)])
    assert [s.event_id for s, _, _ in batch.good] == ["a", "b"]
    [(record, error)] = batch.bad
    assert (record.offset, error.error_class, str(error)) == (1, "internal_error", "validation failed: RuntimeError")
    assert "record t[3]@1 broke validation" in caplog.text and "RuntimeError: a bug" in caplog.text


# --- the record size limit holds to the byte ------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(256, 50_000),
    delta=st.integers(-40, 40),
    filler=st.sampled_from(["x", "é", "中", "😀", "\n", "\\"]),
)
def test_record_size_limit_holds_to_the_byte(limit: int, delta: int, filler: str) -> None:
    event = {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up", "pad": ""}
    base = len(json.dumps(event, ensure_ascii=False).encode())
    target = limit + delta
    if target < base:
        return
    unit = len(json.dumps(filler, ensure_ascii=False).encode()) - 2  # its bytes in the JSON text
    pad = filler * ((target - base) // unit)
    raw = json.dumps({**event, "pad": pad}, ensure_ascii=False).encode()
    raw += b" " * (target - len(raw))  # trailing whitespace: still the same JSON
    assert len(raw) == target
    if target <= limit:
        assert decode_feedback(raw, limit).event_id == "e"
    else:
        with pytest.raises(EventRejected) as info:
            decode_feedback(raw, limit)
        assert info.value.error_class == "too_large"
        assert str(info.value) == f"record is {target} bytes, over the {limit}-byte limit"


# --- every accepted record is stored by real PostgreSQL, as classified ----------------------------------
@pytest.fixture
def pg_loop(pg_dsn: str) -> Iterator[tuple[asyncio.AbstractEventLoop, Database]]:
    """A database with the schema, on an event loop of this (synchronous, hypothesis-driven) test."""
    loop = asyncio.new_event_loop()
    db = loop.run_until_complete(Database.connect(load_settings(database={"url": pg_dsn}).database))
    try:
        yield loop, db
    finally:
        loop.run_until_complete(db.close())
        loop.close()


def _numbers_exact(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


async def _store_and_read(db: Database, settings_: Settings, values: list[bytes]) -> None:
    await db.execute("TRUNCATE samples, jobs, windows, model_lines CASCADE")
    batch = classifier(settings_).classify([RawRecord("t", 0, i, None, v, []) for i, v in enumerate(values)])
    if not batch.good:
        return
    outcome = await windows.write_batch(db, batch.good, WindowPolicy(max_samples=7), batch.lines)
    assert outcome.inserted + outcome.duplicates == len(batch.good)
    first: dict[str, Any] = {}
    for sample, _, _ in batch.good:
        first.setdefault(sample.event_id, sample)
    assert outcome.inserted == len(first)
    rows = await db.fetch("SELECT *, prompt::text AS prompt_text FROM samples")  # asyncpg decodes every column
    assert len(rows) == len(first)
    for row in rows:
        sample = first[row["event_id"]]  # the first copy of an id wins
        assert _numbers_exact(row["prompt_text"]) == _numbers_exact(sample.prompt)  # jsonb keeps decimal values
        assert (row["completion"], row["weight"], row["label"]) == (sample.completion, sample.weight, sample.label)
        assert (row["user_id"], row["session_id"], row["event_time"]) == (
            sample.user_id,
            sample.session_id,
            sample.event_time,
        )


@pytest.mark.integration
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(values=st.lists(events.map(_encode) | records, min_size=1, max_size=12))
def test_every_accepted_record_is_stored_as_classified(
    pg_loop: tuple[asyncio.AbstractEventLoop, Database], values: list[bytes]
) -> None:
    loop, db = pg_loop
    loop.run_until_complete(asyncio.wait_for(_store_and_read(db, SETTINGS, values), 30))


@pytest.mark.integration
def test_every_corpus_class_is_stored_or_rejected(pg_loop: tuple[asyncio.AbstractEventLoop, Database]) -> None:
    """The fuzz corpus, 40 records of each class, through classification and the real batch write."""
    loop, db = pg_loop
    corpus = Corpus(seed=7, model=MODEL, max_record_bytes=16_384, max_prompt_chars=2_000, max_completion_chars=1_000)
    values = [corpus.make(name).value for name in corpus.classes for _ in range(40)]
    loop.run_until_complete(_store_and_read(db, SETTINGS, [v for v in values if v is not None]))


# --- length limits: reject or truncate, never silently ---------------------------------------------------
def _event(**fields: Any) -> FeedbackEvent:
    base: dict[str, Any] = {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up"}
    return FeedbackEvent.model_validate({**base, **fields})


def _policy(mode: str) -> SamplePolicy:
    return SamplePolicy(kind_weights={}, max_prompt_chars=10, max_completion_chars=5, overlength=mode)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "p" * 11}, "prompt is 11 characters, over samples.max_prompt_chars (10)"),
        (
            {"prompt": [{"role": "system", "content": "s" * 6}, {"role": "user", "content": "u" * 6}]},
            "prompt is 12 characters, over samples.max_prompt_chars (10)",
        ),
        ({"response": "r" * 6}, "response is 6 characters, over samples.max_completion_chars (5)"),
        (
            {"kind": "correction", "response": "ok", "correction": "c" * 9},
            "correction is 9 characters, over samples.max_completion_chars (5)",
        ),
    ],
)
def test_overlength_reject_names_the_field_and_its_length(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(EventRejected) as info:
        to_sample(_event(**fields), _policy("reject"))
    assert (info.value.error_class, str(info.value)) == ("too_long", message)


def test_texts_at_the_limit_are_untouched_in_both_modes() -> None:
    for mode in ("reject", "truncate"):
        sample = to_sample(_event(prompt="p" * 10, response="r" * 5), _policy(mode))
        assert (json.loads(sample.prompt), sample.completion, sample.truncated) == ("p" * 10, "r" * 5, ())


def test_truncate_keeps_the_end_of_the_prompt_and_the_start_of_the_completion() -> None:
    sample = to_sample(_event(prompt="0123456789ABCDEF", response="abcdefgh"), _policy("truncate"))
    assert (json.loads(sample.prompt), sample.completion) == ("6789ABCDEF", "abcde")
    assert sample.truncated == ("prompt", "completion")
    correction = to_sample(_event(kind="correction", correction="xyz" * 3), _policy("truncate"))
    assert (correction.completion, correction.truncated) == ("xyzxy", ("completion",))


def test_truncate_drops_the_earliest_messages_first() -> None:
    prompt = [
        {"role": "system", "content": "SYSTEM"},
        {"role": "user", "content": "abcdef", "name": "ann"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "why?"},
    ]
    sample = to_sample(_event(prompt=prompt), _policy("truncate"))
    assert json.loads(sample.prompt) == [
        {"role": "user", "content": "cdef", "name": "ann"},  # 10 - 4 - 2 characters left
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "why?"},
    ]
    assert sample.truncated == ("prompt",)


# --- ingest's decoder: the same accepted records, values and reasons as the model ------------------------
def _outcome(decode: Callable[[bytes | None, int], Feedback], raw: bytes | None) -> Any:
    """What a decoder makes of ``raw``: the reason it gives, or the fields with their types and time offset."""
    try:
        fields = decode(raw, 16_384)
    except EventRejected as exc:
        return exc.error_class, str(exc)
    when = fields.timestamp
    return fields, [type(v) for v in msgspec.structs.astuple(fields)], when and (when.tzinfo, when.utcoffset())


def _by_the_model(raw: bytes | None, max_bytes: int) -> Feedback:
    return Feedback.of(decode_feedback(raw, max_bytes))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=records | events.map(_encode) | valid_events.map(_encode) | st.none())
def test_ingest_decoder_agrees_with_the_model(raw: bytes | None) -> None:
    assert _outcome(decode_fields, raw) == _outcome(_by_the_model, raw)


_BASE = '"event_id": "e", "model": "tiny-llama", "prompt": "p", "response": "r"'
_BODIES = [
    '"kind": "rating", "rating": 5.0', '"kind": "rating", "rating": 5e0', '"kind": "rating", "rating": true',
    '"kind": "rating", "rating": "5"', '"kind": "rating"', '"kind": "correction", "correction": ""',
    '"kind": "thumbs_up", "weight": 2', '"kind": "thumbs_up", "weight": 1e6', '"kind": "thumbs_up", "weight": 0',
    '"kind": "thumbs_up", "weight": 1e-320', '"kind": "thumbs_up", "weight": NaN', '"kind": "thumbs_up", "x": NaN',
    '"kind": "thumbs_up", "x": Infinity', '"kind": "thumbs_up", "x": 1e400', '"kind": "thumbs_up", "x": -0.0',
    '"kind": "thumbs_up", "x": ' + "[" * 150 + "]" * 150, '"kind": "thumbs_up", "x": ' + "[" * 250 + "]" * 250,
    '"kind": "thumbs_up", "x": ' + '{"a": ' * 201 + "1" + "}" * 201, '"kind": "thumbs_up", "user_id": "\\u0000"',
    '"kind": "thumbs_up", "user_id": "a\\u0000"', '"kind": "thumbs_up", "x": "a\\u0000"',
    '"kind": "thumbs_up", "user_id": "\\ud83d\\ude00"', '"kind": "thumbs_up", "user_id": "\\ud800"',
    '"kind": "thumbs_up", "user_id": "' + "\U0001f600" * 256 + '"',
    '"kind": "thumbs_up", "user_id": "' + "\U0001f600" * 257 + '"', '"kind": "thumbs_up", "kind": "rating"',
    '"kind": "thumbs_up", "user_id": null, "rating": null, "timestamp": null', '"kind": "THUMBS_UP"',
]  # fmt: skip
_TIMESTAMPS = [
    "2024-01-01", "2024-01-01T00:00:00", "2024-01-01T00:00:00.1234567Z", "2024-01-01t00:00:00z",
    "2024-01-01 00:00:00+01:00", "1700000000", "1700000000.5", "2024-01-01T23:59:60Z", "0001-01-01T00:00:00+00:01",
    "0001-01-02T00:00:00+23:59", "9999-12-31T23:59:59-00:01", "9998-12-31T23:59:59-23:59", "2024-02-30T00:00:00Z",
    "2024-01-01T00:00:00+24:00", "",
]  # fmt: skip
_PROMPTS = [
    "[]", '[{"role": "", "content": "c"}]', '[{"role": "u"}]', '[{"role": "u", "content": null}]',
    '[{"role": "u", "content": "c", "name": "n"}]', '[{"role": "u", "content": "c", "n": 1}]',
    '[{"role": "u", "content": "c", "role": "s"}]', '[{"content": "c", "role": "u"}]', '"[]"',
]  # fmt: skip
EDGE_CASES = (
    _BODIES
    + [f'"kind": "thumbs_up", "timestamp": "{t}"' for t in _TIMESTAMPS]
    + [f'"kind": "thumbs_up", "prompt": {m}' for m in _PROMPTS]
)


@pytest.mark.parametrize("body", EDGE_CASES)
def test_ingest_decoder_agrees_with_the_model_on_edge_cases(body: str) -> None:
    raw = ("{" + _BASE + ", " + body + "}").encode()
    assert _outcome(decode_fields, raw) == _outcome(_by_the_model, raw)
    assert _outcome(decode_fields, b"\xef\xbb\xbf" + raw) == _outcome(_by_the_model, b"\xef\xbb\xbf" + raw)


def test_the_common_record_is_decoded_without_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of ``decode_fields``: a plain valid record never reaches pydantic's model (its speed is in
    bench/ingest.py); only a reject or a rarer form does, for the model's reason and values."""

    def unused(raw: bytes | None, max_bytes: int) -> FeedbackEvent:
        raise AssertionError("the model decoded a plain record")

    plain: list[dict[str, Any]] = [
        {"prompt": "2+2?", "kind": "thumbs_up"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 😀"}]},
        {"kind": "rating", "rating": 4, "weight": 2, "timestamp": "2024-05-06T07:08:09+02:00"},
        {"kind": "correction", "correction": "4", "user_id": "u", "session_id": "s", "adapter_version": "v1.2"},
        {"timestamp": "2024-05-06T07:08:09.5Z", "trace": {"id": [1, None, True]}, "response": 'say "hi"\n'},
    ]
    monkeypatch.setattr(events_module, "decode_feedback", unused)
    for fields in plain:
        event = {"event_id": "e", "model": MODEL, "prompt": "p", "response": "r", "kind": "thumbs_up", **fields}
        for ensure_ascii in (True, False):
            decoded = decode_fields(json.dumps(event, ensure_ascii=ensure_ascii).encode(), 16_384)
            assert (decoded.prompt, decoded.response) == (event["prompt"], event["response"])


# --- the fuzz script -------------------------------------------------------------------------------------
def test_fuzz_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fuzz.json"
    assert main(["--seconds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failures"] == 0 and result["inputs"] >= len(result["classes"])
    assert all(c["tried"] > 0 for c in result["classes"].values())
    assert "| enormous_string |" in capsys.readouterr().out
