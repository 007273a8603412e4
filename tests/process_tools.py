"""Running real `streamengine` processes in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from streamengine.config import Settings


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
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
        [sys.executable, "-m", "streamengine.cli", "--config", str(config), *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
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
