"""`streamengine top` against a running engine: every section with the numbers the engine holds, plain text when
piped, and the live view on a terminal, which `q` quits."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from streamengine.config.settings import Settings
from streamengine.store import job_queue
from streamengine.store.db import Database
from tests.engine_tools import add_adapter, add_samples, engine_running, fill_window

pytestmark = pytest.mark.integration

TOP = [sys.executable, "-m", "streamengine.cli.main", "top"]
JSON = {"Content-Type": "application/json"}  # no token set: mutating requests must say JSON
PROGRESS = {
    "phase": "training", "step": 6, "total_steps": 12, "epoch": 1, "loss": 0.5, "eta_s": 3.0,
    "recent_losses": [0.9, 0.7, 0.5],
}  # fmt: skip


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    return {**env, "STREAMENGINE_API__URL": settings.api.base_url(), "COLUMNS": "160", "NO_COLOR": ""}


async def _engine_state(db: Database, http: httpx.AsyncClient) -> int:
    """Two releases (v1.1 in production, deployed through the API), a training job at step 6 of 12, and 10
    samples in the open window; returns the running job's id."""
    await add_adapter(db, "v1.0")
    gate = {"eval_loss_before": 2.0, "eval_loss_after": 1.5, "holdout_improvement": 0.25, "forgetting": 0.02}
    await add_adapter(db, "v1.1", parent_version="v1.0", metrics=gate)
    for version in ("v1.0", "v1.1"):
        assert (await http.post(f"/adapters/{version}/deploy", json=None, headers=JSON)).status_code == 200
    await fill_window(db, 0, 16)  # a closed window: one queued job
    job = await job_queue.claim(db, "worker-top", 60, 3)
    assert job is not None
    assert await job_queue.heartbeat(db, job.id, "worker-top", 60, PROGRESS)
    await add_samples(db, 100, 10)
    return job.id


def _pty_top(env: dict[str, str]) -> tuple[int | None, str]:
    """`top` on a terminal: wait for a frame, press q; its exit code (None: still running 10 s later) and what it
    drew."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: top on the terminal
        os.execvpe(TOP[0], [*TOP, "--interval", "0.2"], env)
    drawn, deadline = b"", time.monotonic() + 30
    while b"q quits" not in drawn and time.monotonic() < deadline:
        drawn += _drain(fd)
    os.write(fd, b"q")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        drawn += _drain(fd)
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return os.waitstatus_to_exitcode(status), drawn.decode(errors="replace")
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None, drawn.decode(errors="replace")


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 65536) if select.select([fd], [], [], 0.1)[0] else b""
    except OSError:  # the terminal closed: top exited
        return b""


async def test_top_shows_every_section_with_the_engines_numbers(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(window={"max_samples": 40})
    async with engine_running(settings) as http:
        db = await Database.connect(settings.database, migrate=False)
        try:
            job_id = await _engine_state(db, http)
            assert (await http.get("/models")).json() == [
                {
                    "model": "tiny-llama",
                    "base_model": settings.model.base,
                    "window": {"max_samples": 40, "max_weight": None, "min_samples": 1, "schedule": "0 2 * * 1",
                               "timezone": "UTC"},
                }
            ]  # fmt: skip
            env = _env(settings)
            piped = await asyncio.to_thread(
                subprocess.run, [*TOP, "--once", "--interval", "0.2"], env=env, capture_output=True, text=True
            )
            code, drawn = await asyncio.to_thread(_pty_top, env)
        finally:
            await db.close()
    assert piped.returncode == 0, piped.stderr
    out = piped.stdout
    assert "\x1b[" not in out and "█" not in out, out  # plain text: no escape codes, ASCII bars
    assert re.search(r"^ingest [\d.]+ events/s  DLQ [\d.]+ events/s", out, re.M), out
    assert "model tiny-llama  production v1.1  previous v1.0" in out, out
    assert re.search(r"window \d+ \[########\.{22}\] 10/40 samples \(25%\), weight 10\.0  next tick in ", out), out
    assert "jobs: 1 running" in out, out
    assert f"job {job_id} running  training  [##########..........] 6/12 steps  eta 3s  loss 0.5000 #=_" in out, out
    assert re.search(r"v1\.1 +production +threshold 16 samples  loss 2\.000 -> 1\.500  improvement \+25\.0%", out)
    assert "forgetting +2.0%" in out and re.search(r"v1\.0 +previous ", out), out
    assert "fleet\n  no fleet data" in out, out
    assert code == 0, drawn[-2000:]
    assert "q quits" in drawn and "6/12 steps" in drawn and "█" in drawn and "loss 0.5000 █▄▁" in drawn, drawn[-2000:]


def test_top_fails_clearly_without_an_engine() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    result = subprocess.run(
        [*TOP, "--once"], env={**env, "STREAMENGINE_API__URL": "http://127.0.0.1:9"}, capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert "admin API at http://127.0.0.1:9 is unreachable" in result.stderr
