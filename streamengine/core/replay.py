"""How much of a job is replay, and which earlier samples it replays (pure: no I/O).

Shared by the worker (:mod:`streamengine.jobs.dataset`) and the forgetting benchmark, so both pick alike.
See docs/learning.md, "Replay: how much and which".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Literal, TypeVar

ReplayScaling = Literal["fixed", "windows"]
ReplaySelection = Literal["uniform", "balanced", "loss"]
T = TypeVar("T")

# Candidates fetched per replay sample kept: enough for balanced picks to reach every distinct prompt of
# earlier windows whose samples repeat (a correction sent by several users), and the pool "loss" scores.
CANDIDATES_PER_SAMPLE = 4


def replay_share(fraction: float, earlier_windows: int, scaling: ReplayScaling, ceiling: float) -> float:
    """The share of a job's samples replayed: ``fraction`` (``fixed``), or ``fraction`` per earlier window up to
    ``ceiling`` (``windows``: with more earlier windows to keep, each keeps about the share one window had)."""
    if earlier_windows <= 0:
        return 0.0
    if scaling == "fixed":
        return fraction
    return min(ceiling, fraction * earlier_windows)


def pick_balanced(candidates: Sequence[T], n: int, window_of: Callable[[T], int],
                  prompt_of: Callable[[T], Hashable]) -> list[T]:  # fmt: skip
    """``n`` of ``candidates`` (in their pseudo-random order) spread over the earlier windows in turn, every
    prompt once before any prompt twice: a uniform pick replays a prompt sent many times again and again and
    leaves others out (49 uniform picks of 48 distinct facts sent 8 times each leave about a third out)."""
    seen: dict[Hashable, int] = {}
    repeat: list[int] = []
    for item in candidates:
        prompt = prompt_of(item)
        repeat.append(seen.get(prompt, 0))
        seen[prompt] = repeat[-1] + 1
    turn: dict[tuple[int, int], int] = {}
    keys: list[tuple[int, int, int, int]] = []
    for i, item in enumerate(candidates):
        group = (repeat[i], window_of(item))
        turn[group] = turn.get(group, -1) + 1
        keys.append((repeat[i], turn[group], window_of(item), i))
    return [candidates[key[3]] for key in sorted(keys)[: max(n, 0)]]
