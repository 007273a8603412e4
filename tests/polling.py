"""The one way tests wait for something: poll a condition until it holds or the time is up."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def _value(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def wait_for(
    predicate: Callable[[], Any],
    timeout_s: float = 30.0,
    interval_s: float = 0.2,
    describe: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``predicate`` (plain or async) until it returns something truthy, and return that.

    After ``timeout_s`` it raises AssertionError naming the last value and, when given, what ``describe``
    (plain or async) returns then: a log tail or a count that explains the failure.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = await _value(predicate())
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{await _value(describe())}" if describe is not None else ""
            raise AssertionError(f"condition not met within {timeout_s}s (last value {value!r}){detail}")
        await asyncio.sleep(interval_s)
