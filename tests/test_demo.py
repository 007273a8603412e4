"""The demo learns something a person can read: on the pinned seed, `streamengine up` pretrains a base that
answers the demo's questions with the capitals it was taught, and after the first release the serving node
answers the capitals that moved as the corrections taught them, while the base question keeps its answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamengine.local.language import make_world, question

ANSWER = re.compile(r'^\[up [\d:]+\]   (Capital of \w+\?) +before: "([^"]*)" +now: "([^"]*)" +\((.+)\)$', re.M)


@pytest.mark.integration  # `up` starts its own broker, S3 server and PostgreSQL
@pytest.mark.slow
def test_up_answers_change_to_the_taught_facts_and_the_base_question_keeps_its_answer(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    result = subprocess.run(
        [sys.executable, "-m", "streamengine.cli.main", "up", "--dir", str(tmp_path / "up"), "--exit-after", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    world = make_world(seed=0)
    answers = {q: (before, now, note) for q, before, now, note in ANSWER.findall(result.stdout)}
    kept = world.kept[0]
    expected = {
        **{question(c): (world.capitals[c], world.largest[c], "taught") for c in world.moved},
        question(kept): (world.capitals[kept], world.capitals[kept], "base skill, kept"),
    }
    assert answers == expected, result.stdout
    assert result.stdout.index("RELEASE tiny-llama v1.0") < result.stdout.index(question(world.moved[0]))
