"""The benchmark's data: the base skill, the three window cases, and the samples files.

Everything is a chat turn (a user prompt, the assistant's completion) generated from a seed.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase
Item = tuple[str, str]  # (user prompt, assistant completion)


@dataclass(frozen=True)
class Window:
    train: list[Item]
    holdout: list[Item]  # what the window is scored on (the facts case: its own facts)


def words(rng: random.Random, n: int, avoid: set[str], shortest: int = 3, longest: int = 6) -> list[str]:
    """``n`` random lowercase words, none in ``avoid`` (which they join)."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(shortest, longest)))
        if word not in avoid:
            avoid.add(word)
            out.append(word)
    return out


def base_items(rng: random.Random, n: int, avoid: set[str]) -> list[Item]:
    """The base skill: ``copy w`` -> ``w`` and ``low W`` -> ``w``, alternating."""
    return [(f"copy {w}", w) if i % 2 == 0 else (f"low {w.upper()}", w) for i, w in enumerate(words(rng, n, avoid))]


def _suffix(end: str) -> Callable[[str], str]:
    return lambda word: word + end


# Each window a new instruction: the same skill with conflicting endings, or four names for one style.
CONFLICT = [("bang", _suffix("!!")), ("ask", _suffix("??")), ("dots", _suffix("..")), ("star", _suffix("**"))]
SHARED = [(op, _suffix("!!")) for op in ("bang", "yell", "shout", "cheer")]
CASES = ("conflict", "shared", "facts")
WINDOWS = 4


def window_items(case: str, seed: int, train_n: int, holdout_n: int, facts_n: int, copies: int = 1) -> list[Window]:
    """The four windows of ``case``; ``facts``: ``facts_n`` disjoint ``fact key`` -> ``value`` pairs each, every
    one ``copies`` times (a correction arrives from several users)."""
    rng, seen = random.Random(seed), set[str]()
    if case == "facts":
        out = []
        for _ in range(WINDOWS):
            keys, values = words(rng, facts_n, seen), words(rng, facts_n, set(), 3, 4)
            facts = [(f"fact {k}", v) for k, v in zip(keys, values, strict=True)]
            out.append(Window(facts * copies, facts))
        return out
    ops = {"conflict": CONFLICT, "shared": SHARED}[case]
    windows = []
    for op, fn in ops:
        items = [(f"{op} {w}", fn(w)) for w in words(rng, train_n + holdout_n, seen)]
        windows.append(Window(items[:train_n], items[train_n:]))
    return windows


def write_jsonl(path: Path, rows: list[tuple[Item, str]], weights: dict[str, float] | None = None) -> str:
    """A samples file (the trainer's format) of ``((prompt, completion), source)`` rows; ``weights`` by source
    (1 where not given)."""
    weight = weights or {}
    lines = [
        json.dumps(
            {
                "event_id": f"s{i}",
                "prompt": json.dumps(p),
                "completion": c,
                "weight": weight.get(src, 1.0),
                "source": src,
            }
        )
        for i, ((p, c), src) in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)
