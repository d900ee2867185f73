"""Watch the config file and ask for a reload when it changes.

The watch is on the file's directory, not the file: editors that save by rename, `cp` over the
file and Kubernetes ConfigMap volumes (which swap a `..data` symlink) all show up as events there,
while a watch on the file itself would miss them (kubernetes/kubernetes#93686). Bursts are
debounced; a slow poll of the file's bytes is a safety net for missed events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

import watchfiles

log = logging.getLogger("canary_proxy.reload")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every event at INFO

DEBOUNCE = 0.15  # seconds of quiet before reloading after a burst of events
POLL_EVERY = 2.0  # safety net


class ConfigWatcher:
    """Calls `reload(reason)` after the config file's contents change (or on request)."""

    def __init__(
        self,
        path: str,
        reload: Callable[[str], Awaitable[tuple[bool, str]]],
        debounce: float = DEBOUNCE,
        poll_every: float = POLL_EVERY,
    ) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.reload = reload
        self.debounce = debounce
        self.poll_every = poll_every
        self._dirty = asyncio.Event()
        self._reasons: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_digest = _digest(self.path)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch()),
            loop.create_task(self._poll()),
            loop.create_task(self._apply()),
        ]

    def request(self, reason: str) -> None:
        """Ask for a reload now (SIGHUP); safe to call from a signal handler callback."""
        self._reasons.append(reason)
        self._dirty.set()

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                async for _changes in watchfiles.awatch(
                    self.directory, stop_event=self._stop, debounce=50, step=25, recursive=False
                ):
                    self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the directory may vanish for a moment (volume swaps)
                log.warning("watching %s failed (%s); retrying", self.directory, exc)
                await asyncio.sleep(1.0)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every)
            if _digest(self.path) != self._last_digest:
                self._dirty.set()

    async def _apply(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # let a burst of writes settle
            self._dirty.clear()
            reasons, self._reasons = self._reasons, []
            digest = _digest(self.path)
            if not reasons and digest == self._last_digest:
                continue
            self._last_digest = digest
            if digest is None and not reasons:
                continue  # mid-swap: the file is briefly absent; the next event brings it back
            reason = reasons[0] if reasons else "file"
            try:
                await self.reload(reason)
            except Exception:
                log.exception("reload failed unexpectedly; the old config keeps serving")


def _digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None
