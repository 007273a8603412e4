"""Redaction of personal data in feedback text before it is stored (pure: no I/O).

Built-in kinds, each replaced by a visible placeholder (``[email]``, ``[phone]``, ``[card]``):

- ``email``: ``local@domain.tld`` (a dotted domain with an alphabetic top-level label, so package specs
  such as ``react@18.2.0`` stay).
- ``card``: 13-19 digits, contiguous or in the printed groups (4-4-4-4[-3], 4-6-5, 4-6-4, spaces or
  dashes), not starting with 0, that pass the Luhn check (so most order ids and other long numbers stay).
- ``phone``: international numbers (``+`` then 8-15 digits in groups: ``+44 20 7946 0958``,
  ``+1 (555) 123-4567``, ``+49 (0)30 1234567``), North American ``(555) 123-4567`` / ``555-123-4567`` /
  ``555.123.4567``, and national numbers with a trunk 0 in groups or contiguous, 9-12 digits
  (``030 1234567``, ``06 12 34 56 78``, ``07911123456``). Dates, times, versions, IP addresses and
  numbers shorter than 8 digits are never phones. Not detected: a national number written without
  ``+``, trunk 0 or separators (``5551234567``): add a ``privacy.patterns`` entry when you have them.

Digits are ASCII digits. Cheap when there is nothing to find: e-mail is looked for from each ``@`` only,
cards and phones only in texts holding at least 8 digits. Extra named patterns and a user function (both
from the ``privacy`` settings) run on every text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from streamengine.contract.events import Feedback, Message
from streamengine.errors import EventRejected

EMAIL, PHONE, CARD = "email", "phone", "card"
BUILTIN_KINDS = (EMAIL, PHONE, CARD)
FUNCTION = "function"
"""The counting kind of the user function (``privacy.function``): one per text it changed."""

# Each pattern starts with a plain character class, so the regex engine skips to candidates in C; the
# "nothing word-like before" condition is a lookbehind right after that first character.
_BEFORE = r"[\w.,+/:-]"
_CARD = re.compile(
    r"[0-9](?<![\w.,+-][0-9])(?:"
    r"[0-9]{12,18}"
    r"|[0-9]{3}(?P<s>[ -])[0-9]{4}(?P=s)[0-9]{4}(?P=s)[0-9]{4}(?:(?P=s)[0-9]{3})?"
    r"|[0-9]{3}(?P<t>[ -])[0-9]{6}(?P=t)[0-9]{4,5}"
    r")(?![\w-]|[.,][0-9])"
)
# Groups of digits take all the digits they can (possessive), so there is no backtracking between them.
_PHONE = re.compile(
    rf"(?:\+(?<!{_BEFORE}\+)[0-9]++(?:(?:[ .-]|[ .-]?\([0-9]{{1,5}}\)[ .-]?)[0-9]++){{0,7}}"  # international
    rf"|\((?<!{_BEFORE}\()[0-9]{{3}}\)[ ]?[0-9]{{3}}[ .-][0-9]{{4}}"  # North American (555) 123-4567
    rf"|[0-9](?<!{_BEFORE}[0-9])(?:"
    r"(?<=0)[0-9]++(?:[ -][0-9]++){0,5}"  # national, trunk 0
    r"|(?<=1)[ .-](?:\([0-9]{3}\)[ ]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"  # North American 1-555-123-4567
    r"|[0-9]{2}[ .-][0-9]{3}[ .-][0-9]{4}"  # North American 555-123-4567
    r"))(?![\w:/-]|[.,][0-9])"
)
_DOMAIN = re.compile(r"(?:[\w-]+\.)+[A-Za-z]{2,}(?![\w-])")
_LOCAL_MARKS = frozenset("._%+-")
_DIGIT_BYTES = b"0123456789"
_NOT_DIGIT = re.compile(r"[^0-9]")
MIN_PHONE_DIGITS = 8
"""No phone number or card number has fewer digits: texts with fewer skip both scans."""


def ascii_digits(text: str) -> int:
    """How many of ``text``'s characters are ASCII digits (UTF-8 bytes 0x30-0x39 are only ever digits)."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw) - len(raw.translate(None, _DIGIT_BYTES))


def may_hold_numbers(text: str) -> bool:
    """Whether ``text`` has the :data:`MIN_PHONE_DIGITS` digits of a phone or card number. Most texts have no digit
    at all, which ten ``in`` scans (memchr) tell at a third of the cost of counting."""
    has_digit = ("0" in text or "1" in text or "2" in text or "3" in text or "4" in text or "5" in text
                 or "6" in text or "7" in text or "8" in text or "9" in text)  # fmt: skip
    return has_digit and ascii_digits(text) >= MIN_PHONE_DIGITS


def redact_emails(text: str) -> tuple[str, int]:
    """``local@domain.tld`` -> ``[email]``: found from each ``@``, so text without one costs nothing."""
    at = text.find("@")
    if at < 0:
        return text, 0
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    while at >= 0:
        start = at
        while start > done and (text[start - 1].isalnum() or text[start - 1] in _LOCAL_MARKS or text[start - 1] == "_"):
            start -= 1
        domain = _DOMAIN.match(text, at + 1) if start < at else None
        if domain is None:
            at = text.find("@", at + 1)
            continue
        parts += (text[done:start], "[email]")
        done = domain.end()
        at = text.find("@", done)
    if not parts:
        return text, 0
    parts.append(text[done:])
    return "".join(parts), len(parts) // 2


def luhn(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment card numbers pass it)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def is_card(candidate: str) -> bool:
    digits = _NOT_DIGIT.sub("", candidate)
    return digits[0] != "0" and luhn(digits)


def is_phone(candidate: str) -> bool:
    digits = len(_NOT_DIGIT.sub("", candidate))
    if candidate[0] == "+":
        return 8 <= digits <= 15
    if candidate[0] == "0":
        return 9 <= digits <= 12
    return True  # North American: the pattern fixes 10 (or 11) digits


def _sub(pattern: re.Pattern[str], placeholder: str, valid: Callable[[str], bool], text: str) -> tuple[str, int]:
    hits = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal hits
        found = match.group()
        if valid(found):
            hits += 1
            return placeholder
        return found

    return pattern.sub(replace, text), hits


@dataclass(frozen=True, slots=True)
class Redactor:
    """What to redact: built-in kinds, extra named patterns (``[name]``), then a user function (str -> str)."""

    kinds: frozenset[str] = frozenset(BUILTIN_KINDS)
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()
    function: Callable[[str], str] | None = None
    _email: bool = field(init=False)
    _numbers: bool = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(BUILTIN_KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kinds: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_email", EMAIL in self.kinds)
        object.__setattr__(self, "_numbers", CARD in self.kinds or PHONE in self.kinds)

    @classmethod
    def build(
        cls, kinds: Iterable[str], patterns: dict[str, str], function: Callable[[str], str] | None = None
    ) -> Redactor:
        """From the ``privacy`` settings' shapes: kind names, name -> regular expression, a callable."""
        compiled = tuple((name, re.compile(regex)) for name, regex in patterns.items())
        return cls(frozenset(kinds), compiled, function)

    @property
    def active(self) -> bool:
        return bool(self.kinds or self.patterns or self.function)

    def text(self, text: str, counts: dict[str, int]) -> str:
        """``text`` with every finding replaced by its placeholder; ``counts`` gets the number per kind.

        A failing user function is an :class:`EventRejected` (the record goes to the DLQ), whose message
        holds no text.
        """
        if not text:
            return text
        if self._email and "@" in text:
            text, hits = redact_emails(text)
            if hits:
                counts[EMAIL] = counts.get(EMAIL, 0) + hits
        if self._numbers and may_hold_numbers(text):
            if CARD in self.kinds:
                text, hits = _sub(_CARD, "[card]", is_card, text)
                if hits:
                    counts[CARD] = counts.get(CARD, 0) + hits
            if PHONE in self.kinds:
                text, hits = _sub(_PHONE, "[phone]", is_phone, text)
                if hits:
                    counts[PHONE] = counts.get(PHONE, 0) + hits
        for name, pattern in self.patterns:
            text, hits = pattern.subn(f"[{name}]", text)
            if hits:
                counts[name] = counts.get(name, 0) + hits
        if self.function is not None:
            text = self._call(text, counts)
        return text

    def _call(self, text: str, counts: dict[str, int]) -> str:
        assert self.function is not None
        try:
            result = self.function(text)
        except Exception as exc:
            raise EventRejected("redaction_failed", f"privacy.function raised {type(exc).__name__}") from None
        if not isinstance(result, str):
            raise EventRejected(
                "redaction_failed", f"privacy.function returned a {type(result).__name__}, not a string"
            )
        if "\x00" in result:
            raise EventRejected("redaction_failed", "privacy.function returned a NUL character")
        if result != text:
            counts[FUNCTION] = counts.get(FUNCTION, 0) + 1
        return result

    def event(self, event: Feedback, counts: dict[str, int]) -> Feedback:
        """The event with its prompt (every message's content), response and correction redacted.

        The same object when nothing changed (the common case costs no copy); so is every message left as it was.
        """
        if not self.active:
            return event
        changes: dict[str, Any] = {}
        prompt = event.prompt
        if isinstance(prompt, str):
            text = self.text(prompt, counts)
            if text != prompt:
                changes["prompt"] = text
        else:
            messages = [self._message(m, counts) for m in prompt]
            if any(new is not old for new, old in zip(messages, prompt, strict=True)):
                changes["prompt"] = messages
        response = self.text(event.response, counts)
        if response != event.response:
            changes["response"] = response
        if event.correction:
            correction = self.text(event.correction, counts)
            if correction != event.correction:
                changes["correction"] = correction
        return msgspec.structs.replace(event, **changes) if changes else event

    def _message(self, message: Message, counts: dict[str, int]) -> Message:
        content = self.text(message["content"], counts)
        return message if content == message["content"] else {**message, "content": content}
