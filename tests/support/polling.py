"""Polling with a deadline: the one way tests wait for something (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(check: Callable[[], Any], timeout: float = 5.0, what: str = "", every: float = 0.02) -> Any:
    """Poll `check()` (sync) until truthy; fail after `timeout` s with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last value: {last!r}")


def wait_until_sync(check: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """`wait_until` for synchronous tests (a subprocess' output, say): blocks between polls."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `await check()` until it returns something truthy; fail with `what` (and the last value)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def holds(check: Callable[[], Any], duration: float, what: str = "", every: float = 0.02) -> None:
    """Assert `check()` stays truthy for `duration` s (checked every `every` s): for "nothing bad
    happens meanwhile" properties, which a single check after a sleep would test only once."""
    deadline = time.monotonic() + duration
    while True:
        value = check()
        if not value:
            raise AssertionError(f"{what or check} stopped holding: {value!r}")
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(every)
