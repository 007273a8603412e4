"""`streamengine up --lines 3`: three model lines of one base learn side by side on the demo producer. Each line
is taught capitals of its own (World.for_line); both demo nodes follow every line, and each line's first release
answers its own taught facts while the base question it does not teach keeps its answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamengine.local.language import make_world, question

LINES = ("tiny-llama", "tiny-llama-b", "tiny-llama-c")
ANSWER = re.compile(r'^\[up [\d:]+\] ([\w-]+)  (Capital of \w+\?) +before: "([^"]*)" +now: "([^"]*)" +\((.+)\)$', re.M)


@pytest.mark.integration  # `up` starts its own broker, S3 server and PostgreSQL
@pytest.mark.slow
def test_up_with_three_lines_releases_each_line_and_each_answers_its_own_taught_facts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    command = ["up", "--dir", str(tmp_path / "up"), "--lines", "3", "--exit-after", "1", "--no-top"]
    result = subprocess.run(
        [sys.executable, "-m", "streamengine.cli.main", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, world = result.stdout, make_world(seed=0)
    assert "each following the lines tiny-llama, tiny-llama-b, tiny-llama-c" in out, out
    answers: dict[str, dict[str, tuple[str, str, str]]] = {}
    for line, asked, before, now, note in ANSWER.findall(out):
        answers.setdefault(line, {}).setdefault(asked, (before, now, note))  # the line's first release
    for index, line in enumerate(LINES):
        assert f"RELEASE {line} v1.0: " in out, out
        own = world.for_line(index)
        kept = own.kept[0]
        expected = {
            **{question(c): (world.capitals[c], world.largest[c], "taught") for c in own.moved},
            question(kept): (world.capitals[kept], world.capitals[kept], "base skill, kept"),
        }
        assert answers.get(line) == expected, out
    # both nodes follow the lines (which node swaps a version in first varies; up may stop before the other does)
    assert re.search(r"node-a swapped (it )?in", out) and re.search(r"node-b swapped (it )?in", out), out
    # the lines are taught different facts
    assert len({frozenset(world.for_line(i).moved) for i in range(len(LINES))}) == len(LINES)
    assert "canary" not in out.replace("canary trials", ""), out
    assert re.search(r"stopped after [3-9] releases", out), out
