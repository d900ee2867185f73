"""Watch the config file and ask for a reload when its contents change.

The watch is on the file's directory, not the file: editors that save by rename, `cp` over the
file and Kubernetes ConfigMap volumes (which swap a `..data` symlink) all show up as events there,
while a watch on the file itself would miss them (kubernetes/kubernetes#93686). Every event in the
directory only marks the watcher dirty; what decides is the digest of the bytes the path resolves
to, so unrelated files in the same directory (a state file, an access log) never cause a reload.
Bursts are debounced; a slow poll of the digest is a safety net for missed events (NFS, overlay
filesystems without inotify).
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

DEBOUNCE = 0.1  # seconds of quiet before reloading after a burst of events
POLL_EVERY = 0.5  # safety net for missed events: hashing a small file twice a second is cheap
RETRY_WATCH = 1.0  # seconds before watching again after the watch failed

ReloadFn = Callable[[str], Awaitable[tuple[bool, str]]]


class ConfigWatcher:
    """Calls `reload(reason)` after the config file's contents change, or when asked to.

    `known` is the digest (see :func:`file_digest`) of the contents already loaded, so a change
    made between loading and :meth:`start` is still picked up.
    """

    def __init__(
        self,
        path: str,
        reload: ReloadFn,
        debounce: float = DEBOUNCE,
        poll_every: float = POLL_EVERY,
        known: str | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        # Not realpath: a ConfigMap's real file lives in a `..<timestamp>` dir that is replaced.
        self.directory = os.path.dirname(self.path)
        self.reload = reload
        self.debounce = debounce
        self.poll_every = poll_every
        self._last_digest = known if known is not None else file_digest(self.path)
        self._dirty = asyncio.Event()
        self._reasons: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start watching (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._stop.clear()
        self._tasks = [
            loop.create_task(self._watch()),
            loop.create_task(self._poll()),
            loop.create_task(self._apply()),
        ]

    def request(self, reason: str) -> None:
        """Reload after the debounce even if the file is unchanged (SIGHUP).

        Safe to call from a signal handler callback: it only sets an event.
        """
        self._reasons.append(reason)
        self._dirty.set()

    async def stop(self) -> None:
        """Stop watching; a reload already running is cancelled (it changes nothing until it swaps)."""
        # Set first: the watch thread polls this event every step and returns promptly.
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            # awatch registers its inotify watch before it first yields, so this callback runs
            # once the watch exists: a change made before then (just after start, or while the
            # watch was down) is caught by comparing the digest then.
            loop.call_soon(self._dirty.set)
            try:
                async for _changes in watchfiles.awatch(
                    self.directory,
                    watch_filter=None,  # the default filter hides names like `*~`; the digest decides
                    stop_event=self._stop,
                    debounce=50,
                    step=25,
                    recursive=False,
                ):
                    self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the directory may vanish for a moment; inotify may be unavailable
                log.warning("watching %s failed (%s); retrying, polling meanwhile", self.directory, exc)
                await asyncio.sleep(RETRY_WATCH)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every)
            if file_digest(self.path) != self._last_digest:
                self._dirty.set()

    async def _apply(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # let a burst of writes settle
            # Clear before reading: an event from now on means "read again", never "lost".
            self._dirty.clear()
            reasons, self._reasons = self._reasons, []
            digest = file_digest(self.path)
            if not reasons and digest == self._last_digest:
                continue
            self._last_digest = digest
            if digest is None and not reasons:
                continue  # briefly absent (delete + create): the event that brings it back reloads
            reason = reasons[0] if reasons else "file"
            try:
                await self.reload(reason)
            except Exception:
                log.exception("reload failed unexpectedly; the old config keeps serving")


def file_digest(path: str) -> str | None:
    """The digest the config loader records as `source_hash` (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return None
