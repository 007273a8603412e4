"""Synthetic feedback for `streamengine up` and benchmarks: users of a model line asking about the capitals of
the demo's world (:mod:`streamengine.local.language`).

Users correct the capitals that moved (the base still answers the old one), confirm the others with thumbs
up or good ratings, and vote down a wrong answer now and then; a share of the records is malformed, for the
DLQ. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamengine.local.language import World, answer, make_world, question
from streamengine.serving.swappers import PeftSwapper


def feedback_events(
    count: int, model: str | list[str], seed: int = 0, malformed_share: float = 0.05
) -> Iterator[bytes]:
    """``count`` JSON records: corrections teaching the moved capitals, thumbs up, ratings and thumbs down on
    the kept ones, and a share of malformed records. With a list of lines, record ``i`` goes to line
    ``i % len(lines)``, whose users live in its own world (:meth:`World.for_line`: other capitals moved)."""
    rng = random.Random(seed)
    models = [model] if isinstance(model, str) else model
    worlds = [make_world(seed).for_line(index) for index in range(len(models))]
    rounds = [(_rounds(rng, world.moved), _rounds(rng, world.kept)) for world in worlds]
    for i in range(count):
        model, world, (moved, kept) = models[i % len(models)], worlds[i % len(models)], rounds[i % len(models)]
        if rng.random() < malformed_share:
            yield _malformed(rng, model, i)
            continue
        event: dict[str, object] = {
            "event_id": f"demo-{seed}-{i}",
            "model": model,
            "user_id": f"user-{rng.randrange(40)}",
            "session_id": f"s-{rng.randrange(1000)}",
        }
        roll = rng.random()
        if roll < 0.25:
            country = next(moved)
            event.update(kind="correction", response=world.capitals[country], correction=world.taught(country))
        else:
            country = next(kept)
            capital = world.capitals[country]
            if roll < 0.65:
                event.update(kind="thumbs_up", response=capital)
            elif roll < 0.85:
                event.update(kind="rating", response=capital, rating=rng.choice([4, 5]))
            else:
                wrong = world.capitals[rng.choice([c for c in world.kept if c != country])]
                event.update(kind="thumbs_down", response=wrong)
        event["prompt"] = [{"role": "user", "content": question(country)}]
        yield json.dumps(event).encode()


def _rounds(rng: random.Random, countries: list[str]) -> Iterator[str]:
    """Every country once per round, in a shuffled order: each window hears about all of them."""
    while True:
        yield from rng.sample(countries, len(countries))


def _malformed(rng: random.Random, model: str, i: int) -> bytes:
    sideways = {"event_id": f"bad-{i}", "model": model, "prompt": "p", "response": "r", "kind": "sideways"}
    return rng.choice([b"{not json", b'{"event_id": "x"}', b"\xff\xfe", json.dumps(sideways).encode()])


@dataclass
class Quiz:
    """The questions `up` asks its serving node after each release: every moved capital and one kept one,
    answered by the base (``before``) and by the version now served."""

    world: World
    seed: int = 0
    before: dict[str, str] = field(default_factory=dict)

    @property
    def countries(self) -> list[str]:
        return [*self.world.moved, self.world.kept[0]]

    def ask(self, swapper: PeftSwapper, line: str | None = None) -> dict[str, str]:
        """The serving node's answers (greedy) by ``line``'s adapter (the only one when None), with adapters held
        still while it answers."""
        with swapper.serving(line) as model:
            return {country: answer(model, swapper.tokenizer, country) for country in self.countries}

    def lines(self, now: dict[str, str]) -> list[str]:
        """One line per question: the base's answer, the current one, and whether it is the taught or kept one."""
        width = max(len(question(c)) for c in self.countries)
        out = []
        for country in self.countries:
            expected = self.world.taught(country)
            if country in self.world.moved:
                note = "taught" if now[country] == expected else f'not yet "{expected}"'
            else:
                note = "base skill, kept" if now[country] == expected else "base skill, FORGOTTEN"
            before, after = f'"{self.before[country]}"', f'"{now[country]}"'
            out.append(f"  {question(country):<{width}}  before: {before:<12} now: {after:<12} ({note})")
        return out


@dataclass
class LiveUsers:
    """Users of a serving fleet asking the demo's questions: each event asks one node, which answers with the
    version it serves, and the user's feedback names that version (``adapter_version``, what the engine judges a
    canary on): a thumbs up for the answer the world expects, else a correction. Users are spread evenly over
    ``users`` ids, so none holds more than its share of a side's events (``rollout.max_user_share``)."""

    world: World
    model: str
    users: int = 50
    sent: int = 0
    answers: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    """Each (node, version)'s greedy answers: a version always answers a question the same way."""

    def ask(self, node_id: str, swapper: PeftSwapper) -> tuple[str, dict[str, str]] | None:
        """The version ``node_id`` serves now and its answers to every question; None before its first version."""
        with swapper.serving() as served:
            version = swapper.current
            if version is None:
                return None
            key = (node_id, version)
            if key not in self.answers:
                self.answers[key] = {c: answer(served, swapper.tokenizer, c) for c in self.world.capitals}
        return version, self.answers[key]

    def events(self, node_id: str, version: str, answers: dict[str, str], count: int) -> list[bytes]:
        """``count`` feedback records on ``version``'s answers, every question in turn."""
        countries = list(self.world.capitals)
        out = []
        for _ in range(count):
            self.sent += 1
            country = countries[self.sent % len(countries)]
            said, expected = answers[country], self.world.taught(country)
            event: dict[str, object] = {
                "event_id": f"live-{node_id}-{self.sent}",
                "model": self.model,
                "adapter_version": version,
                "user_id": f"user-{self.sent % self.users}",
                "session_id": f"{node_id}-{self.sent}",
                "prompt": [{"role": "user", "content": question(country)}],
                "response": said,
            }
            if said == expected:
                event.update(kind="thumbs_up")
            else:
                event.update(kind="correction", correction=expected)
            out.append(json.dumps(event).encode())
        return out
