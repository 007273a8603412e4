"""Fuzz the feedback decoder: random, hostile and mutated records through ingest's classification step.

Every input goes through :meth:`streamengine.stream.ingest.IngestPipeline.classify` (decode, validate,
model line, event -> sample with the length limits, COPY line: everything ingest does before the
database), one record at a time. An input passes when it is accepted or rejected with
:class:`~streamengine.errors.EventRejected` as its class expects; it fails when classification raises,
rejects it as ``internal_error`` (an exception caught as a bug), or disagrees with the expectation.

Classes (``expect``): ``valid`` and ``near_limit`` (accepted), ``duplicate`` (accepted here, dropped by
the store), ``mutated`` (random byte edits of a valid record: either outcome, never a crash), every other
class rejected. :class:`Corpus` is reproducible from its seed; the fuzz test of the real consumer
(``tests/test_fuzz.py``) produces its records.

Run: ``python -m bench.fuzz_decoder --seconds 60 --json bench/results/fuzz_decoder.json`` (or
``--inputs N``). Prints one row per class (inputs, accepted, rejected by reason, failures, mean time) and
the process's peak RSS; exits 1 when any input failed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from streamengine.config.settings import Settings, load_settings
from streamengine.contract.events import FeedbackKind
from streamengine.store.db import Database
from streamengine.stream.ingest import IngestPipeline, RawRecord, RecordSender

Expect = Literal["valid", "duplicate", "reject", "any"]
KINDS = [k.value for k in FeedbackKind]
TEXT = "abc XYZ .,;:!? é ü ß 中文 日本語 한국어 😀 🚀 \" ' \\ / \t \n \r \u2028 \u00a0 <b>&amp;</b> {} []"
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xc0\xaf", b"\x80"]
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
MAX_DEPTH = 200
"""Deepest JSON nesting the decoder parses (pydantic-core); deeper is ``invalid_json``."""


@dataclass(frozen=True, slots=True)
class Case:
    cls: str
    value: bytes | None
    expect: Expect
    event_id: str | None = None
    """A valid event's id (a duplicate carries the id of an earlier valid one)."""


@dataclass
class Corpus:
    """Records of every class for one model line and one set of limits, reproducible from ``seed``."""

    seed: int = 0
    model: str = "tiny-llama"
    max_record_bytes: int = 1_048_576
    max_prompt_chars: int = 65_536
    max_completion_chars: int = 65_536
    rng: random.Random = field(init=False)
    count: int = field(init=False, default=0)
    valid_ids: deque[str] = field(init=False, default_factory=lambda: deque(maxlen=1000))
    """Ids of recent valid events, for duplicates."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.classes: dict[str, Callable[[], Case]] = {
            "valid": self.valid_event,
            "near_limit": self.near_limit,
            "duplicate": self.duplicate,
            "random_bytes": self.random_bytes,
            "invalid_utf8": self.invalid_utf8,
            "other_encoding": self.other_encoding,
            "not_object": self.not_object,
            "deep_nesting": self.deep_nesting,
            "too_large": self.too_large,
            "wrong_type": self.wrong_type,
            "missing_field": self.missing_field,
            "unknown_kind": self.unknown_kind,
            "unknown_model": self.unknown_model,
            "enormous_string": self.enormous_string,
            "bad_weight": self.bad_weight,
            "huge_int": self.huge_int,
            "nul": self.nul,
            "message_extra": self.message_extra,
            "bad_timestamp": self.bad_timestamp,
            "empty": self.empty,
            "mutated": self.mutated,
        }

    def make(self, cls: str) -> Case:
        self.count += 1
        return self.classes[cls]()

    # --- helpers ---------------------------------------------------------------------------------------
    def _text(self, low: int = 0, high: int = 40) -> str:
        return "".join(self.rng.choice(TEXT) for _ in range(self.rng.randint(low, high)))

    def _event(self) -> dict[str, Any]:
        """A valid event (fresh id) as a dict."""
        rng = self.rng
        kind = rng.choice(KINDS)
        event: dict[str, Any] = {
            "event_id": f"fz-{self.seed}-{self.count}",
            "model": self.model,
            "prompt": self._text(1),
            "response": self._text(),
            "kind": kind,
        }
        if rng.random() < 0.4:
            event["prompt"] = [
                {"role": rng.choice(["system", "user", "assistant"]), "content": self._text()}
                for _ in range(rng.randint(1, 4))
            ]
            if rng.random() < 0.3:
                event["prompt"][0]["name"] = self._text(1, 8)
        if kind == "rating":
            event["rating"] = rng.randint(1, 5)
        if kind == "correction":
            event["correction"] = self._text(1)
        optional: dict[str, Any] = {
            "weight": round(rng.uniform(0.01, 1000), 3),
            "user_id": f"u{rng.randrange(50)}",
            "session_id": self._text(1, 20),
            "adapter_version": f"v1.{rng.randrange(9)}",
            "timestamp": f"20{rng.randint(10, 30)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:00:00"
            + rng.choice(["Z", "+02:00", "-05:30", ".123456Z"]),
            "trace": {"id": [rng.randrange(10**9), None, True], "note": self._text()},
        }
        event.update({k: v for k, v in optional.items() if rng.random() < 0.5})
        return event

    def _bytes(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5).encode()

    def _with(self, placeholder_field: str, literal: bytes, event: dict[str, Any] | None = None) -> bytes:
        """An event whose ``placeholder_field`` holds a raw JSON ``literal`` (NaN, a huge int, bad bytes...)."""
        event = dict(event or self._event())
        event[placeholder_field] = "@@PLACEHOLDER@@"
        return json.dumps(event).encode().replace(b'"@@PLACEHOLDER@@"', literal)

    # --- accepted --------------------------------------------------------------------------------------
    def valid_event(self) -> Case:
        event = self._event()
        self.valid_ids.append(event["event_id"])
        return Case("valid", self._bytes(event), "valid", event["event_id"])

    def near_limit(self) -> Case:
        """Valid, within a few bytes of ``max_record_bytes``: padded with an unknown field (kept, ignored)."""
        event = self._event()
        event["padding"] = ""
        size = len(json.dumps(event).encode())  # ASCII-escaped: the length is exact
        event["padding"] = "p" * (self.max_record_bytes - size - self.rng.randint(0, 16))
        self.valid_ids.append(event["event_id"])
        return Case("near_limit", json.dumps(event).encode(), "valid", event["event_id"])

    def duplicate(self) -> Case:
        if not self.valid_ids:
            return self.valid_event()
        first = self.rng.choice(self.valid_ids)
        event = {**self._event(), "event_id": first, "response": "a different answer " + self._text()}
        return Case("duplicate", self._bytes(event), "duplicate", first)

    # --- rejected --------------------------------------------------------------------------------------
    def random_bytes(self) -> Case:
        size = self.rng.choice([self.rng.randint(0, 16), self.rng.randint(0, 400), self.rng.randint(0, 4000)])
        raw = self.rng.randbytes(size)
        if self.rng.random() < 0.3:
            raw = b"{" + raw  # looks like JSON for one byte
        return Case("random_bytes", raw, "reject")

    def invalid_utf8(self) -> Case:
        event = {**self._event(), "response": "@@BAD@@"}
        raw = self._bytes(event).replace(b"@@BAD@@", b"ok " + self.rng.choice(BAD_UTF8) + b" ok")
        return Case("invalid_utf8", raw, "reject")

    def other_encoding(self) -> Case:
        text = json.dumps(self._event())
        raw = self.rng.choice(
            [b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode("utf-32"), text.encode("utf-16-le")]
        )
        return Case("other_encoding", raw, "reject")

    def not_object(self) -> Case:
        value = self.rng.choice([[self._event()], self._text(), 42, -1.5, None, True, [], ""])
        return Case("not_object", json.dumps(value).encode(), "reject")

    def deep_nesting(self) -> Case:
        depth = self.rng.choice([MAX_DEPTH + 1, 1000, 10_000, 100_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        nested = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
        where = self.rng.random()
        if where < 0.3:
            raw = nested
        else:
            name = self.rng.choice(["trace", "prompt", "response", "weight", "rating"])
            raw = self._with(name, nested)
        return Case("deep_nesting", raw, "reject")

    def too_large(self) -> Case:
        event = self._event()
        event["padding"] = "p" * (self.max_record_bytes + self.rng.randint(1, self.max_record_bytes))
        return Case("too_large", json.dumps(event).encode(), "reject")

    def wrong_type(self) -> Case:
        wrong: dict[str, list[Any]] = {
            "event_id": [1, 1.5, True, None, [], {}, ["e"], ""],
            "model": [1, None, [], {"name": self.model}, ""],
            "prompt": [
                1,
                None,
                {},
                [],
                [1],
                ["text"],
                [{"role": 1, "content": "x"}],
                [{"role": "user"}],
                [{"role": "", "content": "x"}],
                [{"role": "user", "content": None}],
            ],
            "response": [1, None, [], {}, ["a"], True],
            "kind": [1, None, [], {}, True],
            "rating": ["5", 5.5, True, [], {}, 0, 6, -1],
            "correction": [1, [], {}, True],
            "weight": ["2", True, [], {}],
            "user_id": [1, [], {}, True, "u" * 257],
            "session_id": [1, [], {}, "s" * 257],
            "adapter_version": [1, [], "v" * 65],
            "timestamp": [True, [], {}, "yesterday", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z"],
        }
        name = self.rng.choice(list(wrong))
        event = self._event()
        if name == "rating":
            event["kind"] = "rating"
        event[name] = self.rng.choice(wrong[name])
        return Case("wrong_type", json.dumps(event).encode(), "reject")

    def missing_field(self) -> Case:
        event = self._event()
        name = self.rng.choice(["event_id", "model", "prompt", "response", "kind", "rating", "correction"])
        if name in ("rating", "correction"):
            event["kind"] = name
        event.pop(name, None)
        return Case("missing_field", self._bytes(event), "reject")

    def unknown_kind(self) -> Case:
        kind = self.rng.choice(["thumbs_sideways", "", "THUMBS_UP", " thumbs_up", "thumbs-up", self._text(1, 10)])
        if kind in KINDS:
            kind += "!"
        return Case("unknown_kind", self._bytes({**self._event(), "kind": kind}), "reject")

    def unknown_model(self) -> Case:
        model = self.rng.choice(["other-model", self.model.upper(), self.model + " ", self._text(1, 30) or "x"])
        if model == self.model:
            model += "-2"
        return Case("unknown_model", self._bytes({**self._event(), "model": model}), "reject")

    def enormous_string(self) -> Case:
        event = self._event()
        if self.rng.random() < 0.5:
            extra = self.rng.randint(1, self.max_prompt_chars)
            if isinstance(event["prompt"], list):
                event["prompt"][-1]["content"] = "q" * (self.max_prompt_chars + extra)
            else:
                event["prompt"] = "q" * (self.max_prompt_chars + extra)
        else:
            name = "correction" if event["kind"] == "correction" else "response"
            event[name] = "r" * (self.max_completion_chars + self.rng.randint(1, self.max_completion_chars))
        return Case("enormous_string", json.dumps(event).encode(), "reject")

    def bad_weight(self) -> Case:
        literal = self.rng.choice([*NON_FINITE, "-1", "0", "-0.0", "1e7", "1000000.5", "1e308", "-1e-300", "5e-324"])
        if literal == "5e-324":
            literal = "-5e-324"  # the smallest subnormal is positive, hence valid: its negative is not
        return Case("bad_weight", self._with("weight", literal.encode()), "reject")

    def huge_int(self) -> Case:
        digits = self.rng.choice([20, 40, 400, 4000, 5000, 20_000])
        number = ("-" if self.rng.random() < 0.3 else "") + "9" * digits
        name = self.rng.choice(["rating", "weight", "event_id", "model", "kind", "timestamp", "user_id"])
        event = self._event()
        if name == "rating":
            event["kind"] = "rating"
        if name == "timestamp" and number.startswith("-"):
            number = number[1:]  # a negative number is a valid time before 1970 when small
        return Case("huge_int", self._with(name, number.encode(), event), "reject")

    def nul(self) -> Case:
        event = self._event()
        where = self.rng.choice(
            [
                "event_id",
                "model",
                "response",
                "correction",
                "user_id",
                "session_id",
                "adapter_version",
                "prompt",
                "role",
                "content",
                "extra_key",
                "extra_value",
            ]
        )
        nul = "a\u0000b"
        if where in ("role", "content", "extra_key", "extra_value"):
            message = {"role": "user", "content": "hi"}
            if where in ("role", "content"):
                message[where] = nul
            elif where == "extra_key":
                message[nul] = "x"
            else:
                message["meta"] = {"deep": [nul]}
            event["prompt"] = [message]
        else:
            if where == "correction":
                event["kind"] = "correction"
            event[where] = nul
        raw = json.dumps(event).encode()
        if self.rng.random() < 0.3:
            raw = raw.replace(b"\\u0000", b"\x00")  # a raw NUL: not even valid JSON
        return Case("nul", raw, "reject")

    def message_extra(self) -> Case:
        """A chat message's extra field (stored with the prompt as jsonb) holding NaN/Infinity."""
        event = {**self._event(), "prompt": [{"role": "user", "content": "hi", "meta": "@@PLACEHOLDER@@"}]}
        literal = self.rng.choice(NON_FINITE)
        inner = self.rng.choice(["%s", "[%s]", '{"score": %s}', '{"a": [1, {"b": %s}]}']) % literal
        raw = json.dumps(event).encode().replace(b'"@@PLACEHOLDER@@"', inner.encode())
        return Case("message_extra", raw, "reject")

    def bad_timestamp(self) -> Case:
        value = self.rng.choice(
            [
                "0001-01-01T00:00:00+00:01",
                "9999-12-31T23:59:59-00:01",
                "0000-01-01T00:00:00Z",
                "10000-01-01T00:00:00Z",
                "2024-01-01T25:00:00Z",
                "2024-00-10T00:00:00Z",
                "",
                "now",
            ]
        )
        return Case("bad_timestamp", self._bytes({**self._event(), "timestamp": value}), "reject")

    def empty(self) -> Case:
        return Case("empty", self.rng.choice([None, b"", b" ", b"\n"]), "reject")

    # --- either ----------------------------------------------------------------------------------------
    def mutated(self) -> Case:
        raw = bytearray(self._bytes(self._event()))
        for _ in range(self.rng.randint(1, 8)):
            at = self.rng.randrange(len(raw))
            edit = self.rng.randrange(5)
            if edit == 0:
                raw[at] ^= 1 << self.rng.randrange(8)
            elif edit == 1:
                raw.insert(at, self.rng.randrange(256))
            elif edit == 2 and len(raw) > 1:
                del raw[at]
            elif edit == 3:
                raw[at:at] = raw[at : at + self.rng.randint(1, 32)]
            else:
                raw[at] = self.rng.choice(b'{}[]",:\\0-eE.')
        return Case("mutated", bytes(raw), "any")


ACCEPTED = ("valid", "near_limit", "duplicate")
EITHER = ("mutated",)


def hostile_classes() -> list[str]:
    """The classes whose every record must be rejected."""
    return [name for name in Corpus().classes if name not in ACCEPTED + EITHER]


# --- the fuzz loop --------------------------------------------------------------------------------------
@dataclass
class ClassStats:
    tried: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def classifier(settings: Settings) -> IngestPipeline:
    """The ingest pipeline, used only for :meth:`~IngestPipeline.classify` (pure CPU: no database, no Kafka)."""
    return IngestPipeline(settings, cast(Database, None), cast(RecordSender, None))


def check(pipeline: IngestPipeline, case: Case, offset: int) -> tuple[str, str | None]:
    """(outcome, failure): outcome is ``accepted`` or the rejection's class; failure says what went wrong."""
    record = RawRecord("fuzz", 0, offset, None, case.value, [])
    try:
        batch = pipeline.classify([record])
    except Exception as exc:  # any escape is the finding
        return "crash", f"{type(exc).__name__}: {str(exc)[:200]}"
    if batch.good:
        outcome = "accepted"
    else:
        error = batch.bad[0][1]
        outcome = error.error_class
        if outcome == "internal_error" or not str(error):
            return outcome, f"{outcome}: {error}"
    if case.expect in ("valid", "duplicate") and outcome != "accepted":
        return outcome, f"expected accepted, got {outcome}: {batch.bad[0][1]}"
    if case.expect == "reject" and outcome == "accepted":
        return outcome, "expected a rejection, was accepted"
    return outcome, None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fuzz(
    inputs: int | None, seconds: float | None, seed: int, settings: Settings, classes: list[str] | None = None
) -> dict[str, Any]:
    """Run inputs round-robin over the classes until ``inputs`` were tried or ``seconds`` passed."""
    pipeline = classifier(settings)
    corpus = Corpus(
        seed=seed,
        model=settings.model.name,
        max_record_bytes=settings.kafka.max_record_bytes,
        max_prompt_chars=settings.samples.max_prompt_chars,
        max_completion_chars=settings.samples.max_completion_chars,
    )
    names = classes or list(corpus.classes)
    stats = {name: ClassStats() for name in names}
    rss_before = peak_rss_mib()
    started = time.perf_counter()
    tried = 0
    while (inputs is None or tried < inputs) and (seconds is None or time.perf_counter() - started < seconds):
        name = names[tried % len(names)]
        case = corpus.make(name)
        began = time.perf_counter()
        outcome, failure = check(pipeline, case, tried)
        stat = stats[name]
        stat.seconds += time.perf_counter() - began
        stat.tried += 1
        if outcome == "accepted":
            stat.accepted += 1
        else:
            stat.rejected[outcome] += 1
        if failure is not None:
            stat.failures.append(f"input {tried} (seed {seed}): {failure}")
        tried += 1
    elapsed = time.perf_counter() - started
    return {
        "seed": seed,
        "inputs": tried,
        "seconds": round(elapsed, 2),
        "inputs_per_second": round(tried / elapsed, 1) if elapsed else None,
        "failures": sum(len(s.failures) for s in stats.values()),
        "peak_rss_mib_before": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "limits": {
            "max_record_bytes": settings.kafka.max_record_bytes,
            "max_prompt_chars": settings.samples.max_prompt_chars,
            "max_completion_chars": settings.samples.max_completion_chars,
            "overlength": settings.samples.overlength,
        },
        "classes": {
            name: {
                "tried": s.tried,
                "accepted": s.accepted,
                "rejected": dict(s.rejected.most_common()),
                "failures": len(s.failures),
                "failure_examples": s.failures[:5],
                "mean_us": round(s.seconds / s.tried * 1e6, 1) if s.tried else None,
            }
            for name, s in stats.items()
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| class | inputs | accepted | rejected (reason: count) | failures | mean us |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, s in result["classes"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "-"
        lines.append(f"| {name} | {s['tried']} | {s['accepted']} | {reasons} | {s['failures']} | {s['mean_us']} |")
    lines.append(
        f"\n{result['inputs']} inputs in {result['seconds']} s ({result['inputs_per_second']}/s), "
        f"{result['failures']} failures; peak RSS {result['peak_rss_mib']} MiB "
        f"(at start {result['peak_rss_mib_before']} MiB); limits {result['limits']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default 10 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-record-bytes", type=int, default=65_536, help="kafka.max_record_bytes")
    parser.add_argument("--max-chars", type=int, default=16_384, help="samples.max_prompt/completion_chars")
    parser.add_argument("--overlength", choices=["reject", "truncate"], default="reject")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.inputs is None and args.seconds is None:
        args.seconds = 10.0
    settings = load_settings(
        kafka={"max_record_bytes": args.max_record_bytes},
        samples={
            "max_prompt_chars": args.max_chars,
            "max_completion_chars": args.max_chars,
            "overlength": args.overlength,
        },
    )
    classes = None
    if args.overlength == "truncate":  # over-long texts are then accepted (truncated): not a hostile class
        classes = [n for n in Corpus().classes if n != "enormous_string"]
    result = fuzz(args.inputs, args.seconds, args.seed, settings, classes)
    print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["classes"].items():
        for example in s["failure_examples"]:
            print(f"FAIL {name}: {example}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
