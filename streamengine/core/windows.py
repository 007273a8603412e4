"""Window policy: when a model line's open window closes (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from streamengine.errors import ConfigError


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    max_samples: int
    max_weight: float | None = None
    min_samples: int = 1

    def close_reason(self, samples: int, weight: float) -> str | None:
        """``"threshold"`` once the window holds enough, else ``None``."""
        if samples >= self.max_samples:
            return "threshold"
        if self.max_weight is not None and weight >= self.max_weight:
            return "threshold"
        return None


def cut_points(samples: int, weight: float, items: Sequence[tuple[bool, float]], policy: WindowPolicy) -> list[int]:
    """Where a run of new samples (trainable?, weight) closes windows, as end indexes (exclusive).

    ``samples``/``weight`` are what the open window already holds; after each cut a fresh window
    starts empty. Windows therefore close exactly at the threshold, whatever the batch size.
    """
    cuts: list[int] = []
    for index, (trainable, sample_weight) in enumerate(items):
        if not trainable:
            continue
        samples += 1
        weight += sample_weight
        if policy.close_reason(samples, weight):
            cuts.append(index + 1)
            samples, weight = 0, 0.0
    return cuts


@dataclass(frozen=True, slots=True)
class Schedule:
    """The cron tick (default weekly, Monday 02:00) in a time zone."""

    cron: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.cron):
            raise ConfigError(f"window.schedule (STREAMENGINE_WINDOW__SCHEDULE): bad cron '{self.cron}'")
        try:
            ZoneInfo(self.timezone)
        except Exception:
            raise ConfigError(f"window.timezone: unknown time zone '{self.timezone}'") from None

    def next_after(self, moment: datetime) -> datetime:
        local = moment.astimezone(ZoneInfo(self.timezone))
        nxt: datetime = croniter(self.cron, local).get_next(datetime)
        return nxt

    def is_due(self, last_tick: datetime, now: datetime) -> bool:
        """True when a fire time lies in (last_tick, now]: missed ticks fire once, not once each."""
        return self.next_after(last_tick) <= now
