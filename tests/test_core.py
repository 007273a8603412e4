"""The pure core: event -> sample, window policy and cron tick, versions, manifests and release records."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from streamengine.contract.events import AdapterReleased, FeedbackEvent, LoraSpec, WindowSpec
from streamengine.core.manifest import Signer, canonical_bytes, is_safe_artifact, sha256_bytes, sign, signature_valid
from streamengine.core.release import build_release, manifest_of, republish
from streamengine.core.samples import Sample, SamplePolicy, to_sample
from streamengine.core.versions import FIRST, Version, next_version
from streamengine.core.windows import Schedule, WindowPolicy, cut_points
from streamengine.errors import ConfigError

POLICY = SamplePolicy(kind_weights={"thumbs_up": 1.0, "rating": 1.0, "correction": 2.0, "thumbs_down": 1.0})


def event(**fields: Any) -> FeedbackEvent:
    base: dict[str, Any] = {"event_id": "e1", "model": "m", "prompt": "2+2?", "response": "4", "kind": "thumbs_up"}
    return FeedbackEvent.model_validate({**base, **fields})


# --- samples -----------------------------------------------------------------------------------------
def test_thumbs_up_is_a_trainable_positive_sample_with_all_fields_carried() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    sample = to_sample(event(user_id="u1", session_id="s1", adapter_version="v1.3", timestamp=when.isoformat()), POLICY)
    assert sample == Sample(
        event_id="e1",
        model="m",
        kind="thumbs_up",
        prompt='"2+2?"',
        completion="4",
        weight=1.0,
        label=1,
        user_id="u1",
        session_id="s1",
        adapter_version="v1.3",
        event_time=when,
    )
    assert sample.trainable


def test_thumbs_down_is_negative_and_not_trainable() -> None:
    sample = to_sample(event(kind="thumbs_down"), POLICY)
    assert (sample.label, sample.weight, sample.completion) == (-1, 1.0, "4")
    assert not sample.trainable


@pytest.mark.parametrize(
    ("rating", "label", "weight"),
    [(5, 1, 1.0), (4, 1, 0.5), (3, 0, 1.0), (2, -1, 0.5), (1, -1, 1.0)],
)
def test_rating_scale(rating: int, label: int, weight: float) -> None:
    sample = to_sample(event(kind="rating", rating=rating), POLICY)
    assert (sample.label, sample.weight) == (label, weight)
    assert sample.trainable is (label == 1)


def test_rating_thresholds_follow_the_policy() -> None:
    strict = SamplePolicy(kind_weights={}, positive_rating_min=5, negative_rating_max=1)
    assert to_sample(event(kind="rating", rating=4), strict).label == 0
    assert to_sample(event(kind="rating", rating=2), strict).label == 0
    assert to_sample(event(kind="rating", rating=5), strict).label == 1
    assert to_sample(event(kind="rating", rating=1), strict).label == -1


def test_client_weight_multiplies_kind_weight_and_rating_scale() -> None:
    assert to_sample(event(weight=3.0), POLICY).weight == 3.0
    assert to_sample(event(kind="rating", rating=4, weight=3.0), POLICY).weight == 1.5
    heavy = SamplePolicy(kind_weights={"rating": 4.0})
    assert to_sample(event(kind="rating", rating=4, weight=0.25), heavy).weight == 0.5


def test_kind_missing_from_the_policy_weighs_one() -> None:
    assert to_sample(event(weight=2.5), SamplePolicy(kind_weights={})).weight == 2.5


def test_correction_trains_on_the_correction_text_with_its_kind_weight() -> None:
    sample = to_sample(event(kind="correction", response="5", correction="4", weight=1.5), POLICY)
    assert (sample.label, sample.completion, sample.weight) == (1, "4", 3.0)
    assert sample.trainable


def test_chat_prompt_is_serialised_as_json_text() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo", "name": "ann"},
    ]
    sample = to_sample(event(prompt=messages), POLICY)
    assert sample.prompt == (
        '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo", "name": "ann"}]'
    )
    assert json.loads(sample.prompt) == messages


def test_string_prompt_is_json_text_too() -> None:
    sample = to_sample(event(prompt='say "ünïcode"'), POLICY)
    assert sample.prompt == '"say \\"ünïcode\\""'
    assert json.loads(sample.prompt) == 'say "ünïcode"'


def test_prompt_text_is_what_json_dumps_writes_for_every_character() -> None:
    text = "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF)  # all but NUL and surrogates
    messages = [{"role": text[:5000], "content": text, text[-99:]: text[::7]}, {"role": "a", "content": "", "n": 1.5}]
    for prompt in (text, messages, messages[:1]):
        assert to_sample(event(prompt=prompt), POLICY).prompt == json.dumps(prompt, ensure_ascii=False)


def test_holdout_is_the_first_four_bytes_of_the_event_ids_sha256() -> None:
    for event_id in ("e1", "evt-000000001-5f2a", "ünïcode", "x" * 256):
        position = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:4], "big") / 2**32
        assert to_sample(event(event_id=event_id), SamplePolicy(kind_weights={}, holdout_fraction=0.5)).holdout == (
            position < 0.5
        )


def test_trainable_needs_positive_label_and_positive_weight() -> None:
    def make(label: int, weight: float) -> Sample:
        return Sample("e", "m", "thumbs_up", '"p"', "c", weight, label, None, None, None, None)

    assert make(1, 0.1).trainable
    assert not make(1, 0.0).trainable
    assert not make(0, 1.0).trainable
    assert not make(-1, 1.0).trainable


# --- windows -----------------------------------------------------------------------------------------
def test_close_reason_by_samples_and_weight() -> None:
    by_count = WindowPolicy(max_samples=3)
    assert by_count.close_reason(2, 1e9) is None
    assert by_count.close_reason(3, 0.0) == "threshold"
    assert by_count.close_reason(4, 0.0) == "threshold"
    by_weight = WindowPolicy(max_samples=100, max_weight=5.0)
    assert by_weight.close_reason(1, 4.99) is None
    assert by_weight.close_reason(1, 5.0) == "threshold"
    assert by_weight.close_reason(100, 0.0) == "threshold"


def test_cut_points_close_exactly_at_the_threshold_several_times_in_one_run() -> None:
    policy = WindowPolicy(max_samples=3)
    assert cut_points(0, 0.0, [(True, 1.0)] * 7, policy) == [3, 6]
    assert cut_points(0, 0.0, [(True, 1.0)] * 9, policy) == [3, 6, 9]
    assert cut_points(0, 0.0, [(True, 1.0)] * 2, policy) == []
    assert cut_points(0, 0.0, [], policy) == []


def test_cut_points_count_what_the_open_window_already_holds() -> None:
    policy = WindowPolicy(max_samples=3)
    assert cut_points(2, 2.0, [(True, 1.0)] * 4, policy) == [1, 4]
    assert cut_points(1, 1.0, [(True, 1.0)] * 4, policy) == [2]


def test_cut_points_skip_non_trainable_items() -> None:
    t, f = (True, 1.0), (False, 1.0)
    items = [t, f, t, f, f, t, t, f, t, t, f]
    # Trainable at 0, 2, 5, 6, 8, 9: windows of two end after indexes 2, 6 and 9.
    assert cut_points(0, 0.0, items, WindowPolicy(max_samples=2)) == [3, 7, 10]
    assert cut_points(0, 0.0, [f] * 10, WindowPolicy(max_samples=1)) == []
    # Non-trainable weight never counts towards max_weight either.
    assert cut_points(0, 0.0, [(False, 100.0), (True, 1.0)], WindowPolicy(max_samples=10, max_weight=2.0)) == []


def test_cut_points_by_max_weight() -> None:
    policy = WindowPolicy(max_samples=100, max_weight=3.0)
    items = [(True, 1.0), (True, 1.5), (True, 0.5), (True, 2.0), (True, 0.75), (True, 0.25), (True, 2.5)]
    assert cut_points(0, 0.0, items, policy) == [3, 6]
    assert cut_points(0, 2.5, items, policy) == [1, 4, 7]
    # Whichever threshold comes first closes the window.
    assert cut_points(0, 0.0, [(True, 0.5)] * 5, WindowPolicy(max_samples=2, max_weight=3.0)) == [2, 4]


def test_bad_cron_names_the_setting_and_its_env_var() -> None:
    for cron in ("not a cron", "61 2 * * 1", "0 2 * *", ""):
        with pytest.raises(ConfigError, match="STREAMENGINE_WINDOW__SCHEDULE") as info:
            Schedule(cron)
        assert "window.schedule" in str(info.value)


def test_bad_timezone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"window\.timezone"):
        Schedule("0 2 * * 1", "Mars/Olympus")


def test_next_after_is_strictly_after() -> None:
    weekly = Schedule("0 2 * * 1")
    monday_0200 = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)  # 2024-01-01 is a Monday
    assert weekly.next_after(monday_0200 - timedelta(hours=1)) == monday_0200
    assert weekly.next_after(monday_0200) == datetime(2024, 1, 8, 2, 0, tzinfo=UTC)


def test_is_due_semantics() -> None:
    weekly = Schedule("0 2 * * 1")
    last = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    assert not weekly.is_due(last, last)
    assert not weekly.is_due(last, datetime(2024, 1, 8, 1, 59, 59, tzinfo=UTC))
    assert weekly.is_due(last, datetime(2024, 1, 8, 2, 0, tzinfo=UTC))


def test_a_tick_missed_for_weeks_fires_once() -> None:
    weekly = Schedule("0 2 * * 1")
    last = datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    now = datetime(2024, 2, 20, 12, 0, tzinfo=UTC)  # seven ticks missed (a Tuesday)
    assert weekly.is_due(last, now)
    last = now  # the tick fired: the caller records it
    assert not weekly.is_due(last, now)
    assert not weekly.is_due(last, datetime(2024, 2, 26, 1, 59, tzinfo=UTC))
    assert weekly.is_due(last, datetime(2024, 2, 26, 2, 0, tzinfo=UTC))


def test_schedule_runs_in_its_time_zone() -> None:
    ny = Schedule("0 2 * * 1", "America/New_York")
    winter = ny.next_after(datetime(2024, 1, 1, 0, 0, tzinfo=UTC))
    assert winter == datetime(2024, 1, 1, 7, 0, tzinfo=UTC)  # 02:00 EST
    assert winter.utcoffset() == timedelta(hours=-5)
    summer = ny.next_after(datetime(2024, 7, 1, 0, 0, tzinfo=UTC))
    assert summer == datetime(2024, 7, 1, 6, 0, tzinfo=UTC)  # 02:00 EDT
    last = datetime(2024, 6, 24, 6, 0, tzinfo=UTC)
    assert not ny.is_due(last, datetime(2024, 7, 1, 5, 59, tzinfo=UTC))
    assert ny.is_due(last, datetime(2024, 7, 1, 6, 0, tzinfo=UTC))
    # The same instant in another zone's notation gives the same answer.
    tokyo = datetime(2024, 7, 1, 15, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 06:00 UTC
    assert ny.is_due(last.astimezone(ZoneInfo("Asia/Tokyo")), tokyo)
    assert not ny.is_due(last, tokyo - timedelta(seconds=1))


# --- versions ----------------------------------------------------------------------------------------
def test_version_parse_and_format() -> None:
    assert Version.parse("v1.0") == Version(1, 0) == FIRST
    assert Version.parse("v12.345") == Version(12, 345)
    assert str(Version(2, 13)) == "v2.13"
    assert str(Version.parse("v3.7")) == "v3.7"


def test_version_order_is_numeric() -> None:
    assert Version.parse("v1.10") > Version.parse("v1.9")
    assert Version.parse("v2.0") > Version.parse("v1.99")
    assert Version(1, 1) <= Version(1, 1)
    texts = ["v1.10", "v2.0", "v1.2", "v1.9", "v10.0"]
    assert [str(v) for v in sorted(Version.parse(t) for t in texts)] == ["v1.2", "v1.9", "v1.10", "v2.0", "v10.0"]


def test_next_version() -> None:
    assert next_version([]) == Version(1, 0)
    assert next_version([], major=True) == Version(1, 0)
    assert next_version(["v1.0"]) == Version(1, 1)
    assert next_version(["v1.9", "v1.10", "v1.2"]) == Version(1, 11)
    assert next_version(["v1.3", "v2.1", "v1.7"]) == Version(2, 2)
    assert next_version(["v1.3", "v2.1"], major=True) == Version(3, 0)


@pytest.mark.parametrize(
    "text", ["1.0", "v1", "v1.0.0", "v1.x", "", "V1.0", " v1.0", "v1.0 ", "v1.0\n", "v-1.0", "v\u0661.\u0660"]
)
def test_bad_version_strings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a version"):
        Version.parse(text)


def test_next_version_refuses_a_bad_existing_version() -> None:
    with pytest.raises(ConfigError):
        next_version(["v1.0", "latest"])


# --- manifests ---------------------------------------------------------------------------------------
def test_canonical_form() -> None:
    manifest = {"b": 1, "a": {"y": [1, 2], "x": "é"}, "signature": "s", "event_id": "id"}
    expected = '{"a":{"x":"é","y":[1,2]},"b":1}'.encode()
    assert canonical_bytes(manifest) == expected
    reordered = {"event_id": "other", "a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert canonical_bytes(reordered) == expected


def test_sign_is_hmac_sha256_of_the_canonical_form() -> None:
    manifest = {"version": "v1.0", "model": "m", "signature": None}
    expected = hmac.new(b"k3y", b'{"model":"m","version":"v1.0"}', hashlib.sha256).hexdigest()
    assert sign(manifest, "k3y") == expected
    assert len(expected) == 64


def test_signature_valid() -> None:
    manifest: dict[str, Any] = {"model": "m", "version": "v1.2", "files": {"a.safetensors": "00"}, "event_id": "e1"}
    manifest["signature"] = sign(manifest, "key")
    assert signature_valid(manifest, "key")
    assert signature_valid({**manifest, "event_id": "e2"}, "key")  # a republication keeps the signature
    assert signature_valid(dict(reversed(list(manifest.items()))), "key")
    assert not signature_valid(manifest, "other-key")
    assert not signature_valid({**manifest, "version": "v1.3"}, "key")
    assert not signature_valid({**manifest, "files": {"a.safetensors": "01"}}, "key")
    assert not signature_valid({**manifest, "extra": 1}, "key")
    assert not signature_valid({k: v for k, v in manifest.items() if k != "signature"}, "key")
    assert not signature_valid({**manifest, "signature": None}, "key")
    assert not signature_valid({**manifest, "signature": 123}, "key")


def test_sha256_bytes() -> None:
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "name",
    [
        "adapter_config.json",
        "adapter_model.safetensors",
        "fisher.safetensors",
        "manifest.json",
        "README.md",
        "tokenizer.model",
        "chat_template.jinja",
        "notes.txt",
    ],
)
def test_safe_artifacts(name: str) -> None:
    assert is_safe_artifact(name)


@pytest.mark.parametrize(
    "name",
    [
        "adapter_model.bin",
        "pytorch_model.bin",
        "weights.pt",
        "weights.pth",
        "state.pkl",
        "state.pickle",
        "model.ckpt",
        "adapter.safetensors.pkl",
        "sub/adapter_config.json",
        "../adapter_config.json",
        "/etc/passwd.txt",
        ".hidden.json",
        ".safetensors",
        "",
    ],
)
def test_unsafe_artifacts(name: str) -> None:
    assert not is_safe_artifact(name)


# --- release records ---------------------------------------------------------------------------------
NOW = datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)


def release(signing_key: str | None = "s3cret") -> AdapterReleased:
    return build_release(
        model="m",
        version="v1.1",
        parent_version="v1.0",
        base_model="tiny",
        uri="s3://lora-adapters/m/v1.1/",
        files={"adapter_model.safetensors": "ab" * 32, "adapter_config.json": "cd" * 32},
        size_bytes=1234,
        lora=LoraSpec(r=16, alpha=32, target_modules=["q_proj", "v_proj"]),
        ewc_lambda=500.0,
        window=WindowSpec(id=7, samples=64, weight=51.5, first_offsets={"0": 10}, last_offsets={"0": 73}),
        metrics={"train_loss": 1.25, "eval_loss_before": 2.5, "eval_loss_after": 0.1, "forgetting": None},
        reason="threshold",
        now=NOW,
        signer=Signer(hmac_key=signing_key) if signing_key else None,
    )


def test_build_release_signs_over_the_json_dump() -> None:
    event = release()
    assert event.signature is not None and len(event.signature) == 64
    assert signature_valid(event.model_dump(mode="json"), "s3cret")
    assert not signature_valid(event.model_dump(mode="json"), "wrong")
    assert (event.model, event.version, event.parent_version, event.reason, event.created_at) == (
        "m",
        "v1.1",
        "v1.0",
        "threshold",
        NOW,
    )
    assert event.window is not None and event.window.samples == 64
    assert event.lora.r == 16


def test_signature_survives_the_wire() -> None:
    """A serving node parses the Kafka value and checks the signature over its own JSON dump."""
    event = release()
    received = AdapterReleased.model_validate_json(event.model_dump_json())
    assert signature_valid(received.model_dump(mode="json"), "s3cret")
    tampered = received.model_copy(update={"uri": "s3://evil/m/v1.1/"})
    assert not signature_valid(tampered.model_dump(mode="json"), "s3cret")


def test_build_release_without_key_is_unsigned() -> None:
    event = release(signing_key=None)
    assert event.signature is None
    assert not signature_valid(event.model_dump(mode="json"), "s3cret")
    assert release(signing_key="").signature is None


def test_each_build_gets_a_fresh_event_id_but_the_same_signature() -> None:
    first, second = release(), release()
    assert first.event_id != second.event_id
    assert first.signature == second.signature


def test_republish_keeps_the_version_and_re_signs() -> None:
    original = release()
    later = NOW + timedelta(days=2)
    again = republish(original, "rollback", later, Signer(hmac_key="s3cret"))
    assert (again.version, again.files, again.uri, again.size_bytes) == (
        original.version,
        original.files,
        original.uri,
        original.size_bytes,
    )
    assert again.metrics == original.metrics and again.window == original.window and again.lora == original.lora
    assert again.event_id != original.event_id
    assert (again.reason, again.created_at) == ("rollback", later)
    assert again.signature != original.signature
    assert signature_valid(again.model_dump(mode="json"), "s3cret")
    assert republish(original, "manual", later, None).signature is None


def test_manifest_of_drops_only_the_event_id() -> None:
    event = release()
    manifest = manifest_of(event)
    assert "event_id" not in manifest
    assert set(manifest) == set(event.model_dump()) - {"event_id"}
    assert manifest["created_at"] == "2024-03-04T05:06:07Z"
    assert manifest["signature"] == event.signature
    assert signature_valid(manifest, "s3cret")
    json.dumps(manifest)  # plain JSON, ready for manifest.json
