"""What every `streamengine` command shares: lazily loaded settings, common options, output, the API client.

Light on imports: a serving node's install imports the CLI without the engine or trainer stacks.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console

from streamengine.config.settings import Settings, load_settings
from streamengine.core.masking import redact, settings_secrets
from streamengine.logs import HIDDEN

T = TypeVar("T")
console = Console()


class State:
    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None
        self._secrets: list[str] = []

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
            self._secrets = settings_secrets(self._settings)
            HIDDEN.add(self._secrets)  # from now on never in a log line
        return self._settings

    def scrub(self, text: str) -> str:
        """``text`` without the secrets of the settings loaded so far (for the one-line error)."""
        return redact(text, self._secrets)


pass_state = click.make_pass_decorator(State)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
model_option = click.option(
    "--model", default=None, help="Model line (default: the only one; required when there are several)."
)


def run_until_signal(make: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run a long-lived coroutine; SIGINT/SIGTERM set its stop event for a clean shutdown."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await make(stop)

    return asyncio.run(runner())


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def client(state: State) -> Any:
    """An :class:`~streamengine.api.client.AdminClient` of the engine named by the settings."""
    from streamengine.api.client import AdminClient

    return AdminClient(state.settings)
