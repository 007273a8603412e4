"""Synthetic feedback for `streamengine up` and benchmarks: a model line learning short facts."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

_COUNTRIES = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
    "Italy": "Rome", "Ghana": "Accra", "Cuba": "Havana", "Nepal": "Kathmandu", "Poland": "Warsaw",
}  # fmt: skip


def feedback_events(count: int, model: str, seed: int = 0, malformed_share: float = 0.05) -> Iterator[bytes]:
    """``count`` JSON records: thumbs up/down, ratings, corrections and a share of malformed ones."""
    rng = random.Random(seed)
    countries = sorted(_COUNTRIES)
    for i in range(count):
        if rng.random() < malformed_share:
            yield rng.choice(
                [
                    b"{not json",
                    b'{"event_id": "x"}',
                    b"\xff\xfe",
                    json.dumps(
                        {"event_id": f"bad-{i}", "model": model, "prompt": "p", "response": "r", "kind": "sideways"}
                    ).encode(),
                ]
            )
            continue
        country = rng.choice(countries)
        capital = _COUNTRIES[country]
        event: dict[str, object] = {
            "event_id": f"demo-{seed}-{i}",
            "model": model,
            "prompt": [{"role": "user", "content": f"Capital of {country}?"}],
            "user_id": f"user-{rng.randrange(40)}",
            "session_id": f"s-{rng.randrange(1000)}",
        }
        roll = rng.random()
        if roll < 0.45:
            event.update(kind="thumbs_up", response=capital)
        elif roll < 0.7:
            event.update(kind="correction", response=rng.choice(countries), correction=capital)
        elif roll < 0.85:
            event.update(kind="rating", response=capital, rating=rng.choice([4, 5]))
        else:
            event.update(kind="thumbs_down", response=rng.choice(countries))
        yield json.dumps(event).encode()
