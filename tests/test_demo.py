"""The demo learns something a person can read: on the pinned seed, `streamengine up` pretrains a base that
answers the demo's questions with the capitals it was taught, and after the first release the serving nodes
answer the capitals that moved as the corrections taught them, while the base question keeps its answer. The
second version goes on trial on the demo fleet's canary node, is judged on the live feedback naming the version
that answered, and is promoted: the production node then swaps it in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamengine.local.language import make_world, question

CANARY = re.compile(
    r"canary v1\.1 on trial on node-a against v1\.0: (\d+)/100 events, negative \d+% vs \d+% \((\d+) events on "
    r"production\) -> PROMOTED \(not_worse: "
)
ANSWER = re.compile(r'^\[up [\d:]+\]   (Capital of \w+\?) +before: "([^"]*)" +now: "([^"]*)" +\((.+)\)$', re.M)


@pytest.mark.integration  # `up` starts its own broker, S3 server and PostgreSQL
@pytest.mark.slow
def test_up_answers_change_to_the_taught_facts_and_its_canary_is_judged_and_promoted(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    result = subprocess.run(
        [sys.executable, "-m", "streamengine.cli.main", "up", "--dir", str(tmp_path / "up"), "--exit-after", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    world = make_world(seed=0)
    out = result.stdout
    first = out[out.index("RELEASE tiny-llama v1.0") : out.index("RELEASE tiny-llama v1.1")]
    answers = {q: (before, now, note) for q, before, now, note in ANSWER.findall(first)}
    kept = world.kept[0]
    expected = {
        **{question(c): (world.capitals[c], world.largest[c], "taught") for c in world.moved},
        question(kept): (world.capitals[kept], world.capitals[kept], "base skill, kept"),
    }
    assert answers == expected, out
    assert out.index("RELEASE tiny-llama v1.0") < out.index(question(world.moved[0]))
    # v1.1 on trial on node-a (the canary), judged on 100 events a side, promoted; then node-b swaps it in
    assert "RELEASE tiny-llama v1.1: " in out and "node-a swapped it in, on trial (canary)" in out, out
    decided = CANARY.findall(out)
    assert len(decided) == 1, out
    canary_events, production_events = (int(n) for n in decided[0])
    assert canary_events >= 100 and production_events >= 100, out
    assert out.index("-> PROMOTED") < out.index("stopped after 2 releases"), out
    assert "node-b swapped in v1.1 too, production" in out, out
