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


def feedback_events(count: int, model: str, seed: int = 0, malformed_share: float = 0.05) -> Iterator[bytes]:
    """``count`` JSON records: corrections teaching the moved capitals, thumbs up, ratings and thumbs down on
    the kept ones, and a share of malformed records."""
    rng = random.Random(seed)
    world = make_world(seed)
    moved, kept = _rounds(rng, world.moved), _rounds(rng, world.kept)
    for i in range(count):
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

    def ask(self, swapper: PeftSwapper) -> dict[str, str]:
        """The serving node's answers (greedy), with adapters held still while it answers."""
        with swapper.serving() as model:
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
