"""How long to wait before trying again: one exponential back-off for every retry loop.

Used by the ingest batch write, the S3 client, the outbox relay, the trainer worker and the
subscriber. Pure: the random number for jitter is passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_EXPONENT = 64
"""Beyond this the cap has long been reached; it keeps ``2.0 ** n`` from overflowing in endless retries."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry ``n`` (1 for the first) waits ``first_s * 2**(n - 1)``, at most ``max_s``.

    With ``jitter`` j, the wait is scaled by a factor between ``1 - j`` and 1, so that clients that
    failed together do not all come back at the same instant.
    """

    first_s: float
    max_s: float
    jitter: float = 0.0

    def delay(self, retry: int, draw: float = 1.0) -> float:
        """Seconds to wait before retry number ``retry``; ``draw``: a uniform random number in [0, 1)."""
        exponent = min(max(retry - 1, 0), _MAX_EXPONENT)
        return min(self.max_s, self.first_s * 2.0**exponent) * (1.0 - self.jitter + self.jitter * draw)
