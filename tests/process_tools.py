"""Running real `streamengine` processes in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from streamengine.config.settings import Settings


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def write_config(settings: Settings, path: Path) -> Path:
    """The settings as a YAML file that `streamengine --config` reads back identically."""
    data = _plain(settings.model_dump(mode="python", by_alias=True))
    path.write_text(yaml.safe_dump(data))
    return path


def start(args: list[str], config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    env["PYTHONUNBUFFERED"] = "1"
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streamengine.cli.main", "--config", str(config), *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def run_cli(
    args: list[str], config: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """One `streamengine` command to its end, output captured; no STREAMENGINE_* variables but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMENGINE_")}
    clean.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200", PYTHONWARNINGS="ignore", **(env or {}))
    options = ["--config", str(config)] if config is not None else []
    return subprocess.run(
        [sys.executable, "-m", "streamengine.cli.main", *options, *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (the trainer child too), as a crash would."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


def children(pid: int | None, marker: str = "") -> list[int]:
    """Live child processes of ``pid`` (None: any process) whose command line contains ``marker`` (Linux /proc)."""
    if pid is None:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    else:  # each thread's children (cheap enough to poll)
        ids = set()
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                ids.update(task.read_text().split())
            except OSError:
                continue
        entries = [Path("/proc") / i for i in ids]
    found = []
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if pid in (None, int(ppid)) and state != "Z" and marker in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
