"""The one back-off every retry loop uses: doubling, capped, jittered when asked, never overflowing."""

from __future__ import annotations

import random

from streamengine.core.backoff import Backoff


def test_waits_double_up_to_the_cap() -> None:
    backoff = Backoff(first_s=0.5, max_s=8.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_endless_retries_stay_at_the_cap() -> None:
    # Ingest and the subscriber retry without limit: a retry count in the thousands must not overflow.
    assert Backoff(first_s=0.1, max_s=5.0).delay(100_000) == 5.0


def test_jitter_takes_off_at_most_its_share() -> None:
    backoff = Backoff(first_s=1.0, max_s=8.0, jitter=0.5)
    assert backoff.delay(3, draw=0.0) == 2.0 and backoff.delay(3, draw=0.999) < 4.0
    rng = random.Random(7)
    waits = [backoff.delay(4, rng.random()) for _ in range(1000)]
    assert 4.0 <= min(waits) < 4.1 and 7.9 < max(waits) < 8.0


def test_without_jitter_the_draw_does_not_matter() -> None:
    assert Backoff(first_s=1.0, max_s=8.0).delay(2, draw=0.1) == 2.0
