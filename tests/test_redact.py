"""Redaction of feedback text before storage: the patterns (what must and must not be redacted), the settings,
the user function, and the ingest step that applies it (pure; the broker-to-PostgreSQL path is in test_privacy)."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from streamengine import metrics
from streamengine.config.settings import PrivacySettings, load_settings
from streamengine.contract.events import decode_fields
from streamengine.core.redact import Redactor, luhn
from streamengine.engine import connect
from streamengine.errors import ConfigError, EventRejected
from streamengine.stream.ingest import IngestPipeline, RawRecord
from streamengine.stream.redaction import build_redactor, load_function
from tests.privacy_functions import explode, not_a_string, redact_names


def redacted(text: str, redactor: Redactor | None = None) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return (redactor or Redactor()).text(text, counts), counts


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail john.doe+tag@example.co.uk please", "mail [email] please", "email"),
        ("Jörg.Müller@exämple.de", "[email]", "email"),
        ("<a@b.io>, c_d@e-f.org.", "<[email]>, [email].", "email"),
        ("card 4111 1111 1111 1111.", "card [card].", "card"),
        ("4111-1111-1111-1111", "[card]", "card"),
        ("pay with 5555555555554444 now", "pay with [card] now", "card"),
        ("amex 3782 822463 10005", "amex [card]", "card"),
        ("call +44 20 7946 0958 today", "call [phone] today", "phone"),
        ("+1 (555) 123-4567", "[phone]", "phone"),
        ("+49 (0)30 1234567", "[phone]", "phone"),
        ("+14155552671", "[phone]", "phone"),
        ("+33 6 12 34 56 78", "[phone]", "phone"),
        ("Tel: +49-30-1234567.", "Tel: [phone].", "phone"),
        ("(555) 123-4567", "[phone]", "phone"),
        ("555-123-4567", "[phone]", "phone"),
        ("555.123.4567", "[phone]", "phone"),
        ("1-555-123-4567", "[phone]", "phone"),
        ("030 1234567", "[phone]", "phone"),
        ("06 12 34 56 78", "[phone]", "phone"),
        ("ring 07911123456", "ring [phone]", "phone"),
        ("0151-12345678", "[phone]", "phone"),
    ],
)
def test_personal_data_is_replaced_by_a_visible_placeholder(text: str, expected: str, kind: str) -> None:
    out, counts = redacted(text)
    assert out == expected
    assert counts == {kind: expected.count(f"[{kind}]")}


@pytest.mark.parametrize(
    "text",
    [
        "released on 2024-01-15 at 10:30:45",
        "15.01.2024",
        "01/15/2024",
        "2024-01-15T10:30:00+01:00",
        "2024-01-15 2024-02-15",
        "01-15-2024 10:30",
        "10:00-12:00",
        "1999-2005",
        "version 1.2.3",
        "v10.0.19041.1",
        "v2.0.1-rc1",
        "react@18.2.0 and @john",
        "192.168.100.200",
        "42",
        "12345",
        "2024",
        "port 8080 and 443",
        "tel 1234567",
        "+5 points",
        "+01:00",
        "order 4111111111111112",  # 16 digits, fails the Luhn check
        "id 1234567890123456",  # 16 digits, fails the Luhn check
        "0000 0000 0000 0000",  # passes Luhn, but no card number starts with 0
        "price 1,234,567.89",
        "3.14159265358979",
        "ISBN 978-3-16-148410-0",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "5551234567",  # documented: a bare national number is not detected
        "",
    ],
)
def test_dates_versions_short_numbers_and_non_luhn_ids_are_kept(text: str) -> None:
    assert redacted(text) == (text, {})


def test_luhn() -> None:
    assert luhn("4111111111111111") and luhn("79927398713") and luhn("0")
    assert not luhn("4111111111111112") and not luhn("79927398710")


def test_kinds_can_be_turned_off_one_by_one() -> None:
    text = "x@example.com 4111111111111111 +44 20 7946 0958"
    assert redacted(text, Redactor.build([], {}))[0] == text
    assert not Redactor.build([], {}).active
    assert redacted(text, Redactor.build(["email"], {}))[0] == "[email] 4111111111111111 +44 20 7946 0958"
    assert redacted(text, Redactor.build(["card", "phone"], {}))[0] == "x@example.com [card] [phone]"


def test_extra_named_patterns_and_the_user_function_run_after_the_built_in_kinds() -> None:
    redactor = Redactor.build(["email"], {"ticket": r"TICKET-\d{4,}"}, redact_names)
    out, counts = redacted("Alice (alice@example.com) opened TICKET-12345 and TICKET-678, Bob too", redactor)
    assert out == "[name] ([email]) opened [ticket] and TICKET-678, [name] too"
    assert counts == {"email": 1, "ticket": 1, "function": 1}
    assert redacted("nothing here", redactor) == ("nothing here", {})


def test_a_failing_user_function_rejects_the_event_without_quoting_its_text() -> None:
    with pytest.raises(EventRejected) as raised:
        redacted("secret text", Redactor.build([], {}, explode))
    assert raised.value.error_class == "redaction_failed"
    assert "RuntimeError" in str(raised.value) and "secret" not in str(raised.value)
    with pytest.raises(EventRejected, match="returned a int, not a string"):
        redacted("text", Redactor.build([], {}, not_a_string))  # type: ignore[arg-type]


def test_an_event_has_every_message_content_response_and_correction_redacted() -> None:
    event = decode_fields(
        json.dumps(
            {
                "event_id": "e1",
                "model": "m",
                "prompt": [
                    {"role": "system", "content": "You help."},
                    {"role": "user", "content": "I am bob@example.com, +44 20 7946 0958", "name": "u1"},
                ],
                "response": "Your card 4111 1111 1111 1111 is noted.",
                "kind": "correction",
                "correction": "Write to support@example.org instead.",
                "user_id": "u1",
            }
        ).encode(),
        10_000,
    )
    counts: dict[str, int] = {}
    out = Redactor().event(event, counts)
    assert isinstance(out.prompt, list) and isinstance(event.prompt, list)
    assert out.prompt[0] is event.prompt[0]  # untouched messages are not copied
    assert out.prompt[1] == {"role": "user", "content": "I am [email], [phone]", "name": "u1"}
    assert out.response == "Your card [card] is noted."
    assert out.correction == "Write to [email] instead."
    assert (out.event_id, out.user_id) == ("e1", "u1")
    assert counts == {"email": 2, "phone": 1, "card": 1}
    assert "bob@example.com" in event.prompt[1]["content"]  # the input is unchanged
    clean = msgspec.structs.replace(event, prompt="hi", response="ok", correction="fine")
    assert Redactor().event(clean, counts) is clean


def test_pathological_inputs_take_linear_time() -> None:
    redactor = Redactor.build(["email", "phone", "card"], {})
    for text in ("a" * 200_000 + "@", "a." * 100_000 + "@", "1" * 200_000, "12 " * 66_000, "+1 " * 66_000,
                 "01-" * 66_000, "(123) " * 33_000, "a@b." * 50_000, "4111 " * 50_000):  # fmt: skip
        started = time.perf_counter()
        redactor.text(text, {})
        assert time.perf_counter() - started < 2.0, text[:20]


def test_privacy_settings_name_the_bad_setting() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.patterns \(STREAMENGINE_PRIVACY__PATTERNS\).*'ticket'"):
        load_settings(privacy={"patterns": {"ticket": "TICKET-(\\d+"}})
    with pytest.raises(ConfigError, match=r"privacy\.patterns.*matches the empty string"):
        load_settings(privacy={"patterns": {"any": "x*"}})
    with pytest.raises(ConfigError, match=r"privacy\.patterns.*not a built-in kind"):
        load_settings(privacy={"patterns": {"email": "x"}})
    with pytest.raises(ConfigError, match=r"privacy\.redact"):
        load_settings(privacy={"redact": ["email", "ssn"]})
    with pytest.raises(ConfigError, match=r"privacy\.function.*package\.module:function"):
        load_settings(privacy={"function": "not a function spec"})
    with pytest.raises(ConfigError, match=r"privacy\.retention_days"):
        load_settings(privacy={"retention_days": 0})


def test_privacy_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_PRIVACY__REDACT", '["email"]')
    monkeypatch.setenv("STREAMENGINE_PRIVACY__PATTERNS", '{"ticket": "TICKET-\\\\d+"}')
    monkeypatch.setenv("STREAMENGINE_PRIVACY__RETENTION_DAYS", "30")
    privacy = load_settings().privacy
    assert (privacy.redact, privacy.patterns, privacy.retention_days) == (["email"], {"ticket": "TICKET-\\d+"}, 30)
    monkeypatch.delenv("STREAMENGINE_PRIVACY__REDACT")
    assert load_settings().privacy.redact == ["email", "phone", "card"]
    assert PrivacySettings().redact == ["email", "phone", "card"] and PrivacySettings().retention_days is None


def test_the_user_function_is_loaded_with_errors_naming_the_setting() -> None:
    assert load_function("tests.privacy_functions:redact_names")("Bob and Carol") == "[name] and Carol"
    redactor = build_redactor(PrivacySettings(function="tests.privacy_functions:redact_names"))
    assert redactor.function is not None and redactor.function.__name__ == "redact_names"
    cases = {
        "no_such_module_5f1c:clean": "cannot import module 'no_such_module_5f1c': ModuleNotFoundError",
        "tests.privacy_functions:missing": "module 'tests.privacy_functions' has no attribute 'missing'",
        "tests.privacy_functions:NOT_CALLABLE": "'tests.privacy_functions:NOT_CALLABLE' is a int, not a function",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError) as raised:
            load_function(spec)
        assert str(raised.value).startswith("privacy.function (STREAMENGINE_PRIVACY__FUNCTION): ")
        assert message in str(raised.value)


async def test_the_engine_refuses_to_start_with_a_function_it_cannot_import(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("STREAMENGINE_")]:
        monkeypatch.delenv(var)
    settings = load_settings(privacy={"function": "no_such_module_5f1c:clean"})
    with pytest.raises(ConfigError, match=r"privacy\.function"):
        await connect(settings)  # before PostgreSQL, Kafka or S3 is contacted


def _record(offset: int, **fields: object) -> RawRecord:
    event = {"event_id": f"r-{offset}", "model": "tiny-llama", "response": "ok", "kind": "thumbs_up", **fields}
    return RawRecord("feedback.events", 0, offset, b"u", json.dumps(event).encode(), [])


def _counter(kind: str) -> float:
    return metrics.REDACTIONS.labels(kind)._value.get()


def test_ingest_redacts_before_the_sample_is_made_and_dlqs_what_the_function_fails_on() -> None:
    settings = load_settings(privacy={"function": "tests.privacy_functions:redact_names"})
    # classify is the pipeline's pure step: it never touches the database or the producer.
    pipeline = IngestPipeline(settings, db=None, sender=None)  # type: ignore[arg-type]
    before = _counter("email"), _counter("function")
    batch = pipeline.classify(
        [
            _record(0, prompt="Alice here: alice@example.com", response="Mail bob@example.com"),
            _record(1, prompt=[{"role": "user", "content": "Call +44 20 7946 0958"}], response="Sure."),
            _record(2, prompt="plain", response="nothing to hide"),
        ]
    )
    assert not batch.bad
    samples = [sample for sample, _, _ in batch.good]
    assert json.loads(samples[0].prompt) == "[name] here: [email]" and samples[0].completion == "Mail [email]"
    assert json.loads(samples[1].prompt) == [{"role": "user", "content": "Call [phone]"}]
    assert "alice@example.com" not in "".join(batch.lines) and "7946" not in "".join(batch.lines)
    assert (_counter("email") - before[0], _counter("function") - before[1]) == (2, 1)

    failing = IngestPipeline(load_settings(privacy={"function": "tests.privacy_functions:explode"}), None, None)  # type: ignore[arg-type]
    batch = failing.classify([_record(3, prompt="secret", response="x")])
    assert not batch.good and batch.bad[0][1].error_class == "redaction_failed"
