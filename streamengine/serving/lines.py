"""A serving node that follows several model lines: one :class:`Subscriber` per line, each with its own state.

Each line's subscriber keeps what :mod:`streamengine.serving.subscriber` describes, for that line alone:
``<download_dir>/<line>/current.json``, its lanes' sequence floors, its canary lane, its status records on
``adapter.status``, and its swapper (a :meth:`PeftSwapper.line` view of one shared in-process model, or an
inference server's adapters named ``<line>@<version>``). So one line's release, refusal or rollback never moves
another line. The lines are named (``models``), or, with ``base``, every line whose releases carry that base
model: the node reads ``adapter.released`` from the beginning, follows each such line it finds, and keeps
watching the topic for lines released later. Neither given: the lines the settings name (``model.name``, or
the named ``models:`` entries; patterns are not expanded).

Cost: each line's subscriber has its own consumer and, when it starts, reads the release (and canary) topic to
its end, skipping the other lines' records; a node of N lines holds N consumers (N + 1 with ``base``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from streamengine.config.lines import line_names
from streamengine.config.settings import Settings
from streamengine.core.versions import base_changed
from streamengine.errors import ConfigError
from streamengine.serving import follow
from streamengine.serving.subscriber import Subscriber
from streamengine.serving.swappers import Swapper

log = logging.getLogger(__name__)


class Subscribers:
    """Keeps a serving node on the latest release of each of several model lines (``models``, or every line of
    ``base``); ``swapper_for(line)`` gives the swapper of each line. ``options`` go to every :class:`Subscriber`."""

    def __init__(
        self,
        settings: Settings,
        swapper_for: Callable[[str], Swapper],
        models: Iterable[str] = (),
        *,
        base: str | None = None,
        **options: Any,
    ) -> None:
        self.settings = settings
        self.swapper_for = swapper_for
        self.models = list(dict.fromkeys(models))
        if base is not None and not base.strip():
            raise ConfigError("--base: the base model whose lines to follow is empty")
        if not self.models and base is None:
            self.models = line_names(settings)
        self.base = base
        self.options = options
        self.lines: dict[str, Subscriber] = {}
        self.ready = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __getitem__(self, model: str) -> Subscriber:
        return self.lines[model]

    async def start(self) -> None:
        """Start (bootstrap) the subscriber of every named line, and with ``base`` of every line of it released
        so far; sets ``ready``."""
        models = list(self.models)
        if self.base is not None:
            self._consumer = await follow.open_consumer(
                self.settings.kafka, "streamengine-subscriber-lines", self.options.get("fetch_wait_ms", 100)
            )
            timeout_s = self.options.get("bootstrap_timeout_s", 60.0)
            records = await follow.read_to_end(
                self._consumer, self.settings.kafka.released_topic, None, timeout_s, self._stopping
            )
            models += [m for m in self._of_base(records or []) if m not in models]
        await asyncio.gather(*(self._follow(model) for model in models))
        log.info("following %d model lines: %s", len(self.lines), ", ".join(self.lines) or "none yet")
        self.ready.set()

    def _of_base(self, records: list[Any]) -> list[str]:
        """The lines of ``records`` (release records) whose release carries ``base``, in order of appearance."""
        found: dict[str, None] = {}
        base = self.base or ""
        for record in records:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                raw = json.loads(record.value)
                model, released_base = raw.get("model"), raw.get("base_model")
                ours = isinstance(released_base, str) and released_base and not base_changed(released_base, base)
                if isinstance(model, str) and ours:
                    found[model] = None
        return list(found)

    async def _follow(self, model: str) -> None:
        if model in self.lines:
            return
        subscriber = Subscriber(self.settings, self.swapper_for(model), model, **self.options)
        self.lines[model] = subscriber
        await subscriber.start()
        self._tasks[model] = asyncio.create_task(subscriber.run(), name=f"subscriber-{model}")

    async def run(self) -> None:
        """Start (unless started); with ``base``, follow lines released later; until :meth:`stop`."""
        try:
            if not self.ready.is_set():
                await self.start()
            consumer = self._consumer
            refreshed = time.monotonic()
            while consumer is not None and not self._stopping.is_set():
                try:
                    if time.monotonic() - refreshed > 5.0:
                        refreshed = time.monotonic()
                        await follow.refresh_assignment(consumer, [self.settings.kafka.released_topic])
                    if not consumer.assignment():
                        await follow.sleep_or(self._stopping, 0.5)
                        continue
                    batch = await consumer.getmany(timeout_ms=self.options.get("poll_ms", 500))
                    for model in self._of_base([r for tp in sorted(batch) for r in batch[tp]]):
                        if model not in self.lines:
                            log.info("a new line of %s: %s", self.base, model)
                            await self._follow(model)
                except KafkaError as exc:
                    log.warning("reading %s failed: %s; retrying", self.settings.kafka.released_topic, exc)
                    await follow.sleep_or(self._stopping, 1.0)
            await self._stopping.wait()
        finally:
            await self._close()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await asyncio.gather(task, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        await asyncio.gather(*(subscriber.stop() for subscriber in self.lines.values()), return_exceptions=True)
        tasks, self._tasks = list(self._tasks.values()), {}
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Subscribers:
        """Run in the background; returns once every line is bootstrapped (raises if starting failed)."""
        self._task = await follow.start_until_ready(self.run(), self.ready, "subscribers")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
