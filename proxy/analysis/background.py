"""Outbound HTTP calls the controller must never wait for (gate webhooks, Prometheus queries).

Each call runs as a tracked task with its own total timeout; the controller tick only starts
calls and reads their last answers, so a URL that hangs, refuses or answers garbage costs a
task, never a stalled loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp

log = logging.getLogger("canary_proxy.rollout")


class Background:
    """A session and the tasks using it; `close` cancels what is still running."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def session(self) -> aiohttp.ClientSession:
        """The shared client session (created on first use, inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def spawn(self, coro: Coroutine[Any, Any, None]) -> bool:
        """Run `coro` as a tracked task; False (and the coroutine closed) outside a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return False
        task = loop.create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    @staticmethod
    async def _guard(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background request failed")

    async def close(self) -> None:
        """Cancel running calls and close the session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
