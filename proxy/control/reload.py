"""Watch the config file and ask for a reload when its contents change.

The watch is on the file's directory, not the file: editors that save by rename, `cp` over the
file and Kubernetes ConfigMap volumes (which swap a `..data` symlink) all show up as events there,
while a watch on the file itself would miss them (kubernetes/kubernetes#93686). Every event in the
directory only marks the watcher dirty; what decides is the digest of the bytes the path resolves
to, so unrelated files in the same directory (a state file, an access log) never cause a reload.
Bursts are debounced; a slow poll of the digest is a safety net for missed events (NFS, overlay
filesystems without inotify).

The data plane comes first: the file is only read off the event loop (a thread), only when it is
a regular file (a FIFO would block `open`, `/dev/zero` never ends) and only up to `max_size` bytes
(a bigger file is told apart by size and mtime without reading it). No exception ends the watch:
each loop logs it and carries on, so later edits and SIGHUP still reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable

import watchfiles

log = logging.getLogger("canary_proxy.reload")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every event at INFO

DEBOUNCE = 0.1  # seconds of quiet before reloading after a burst of events
POLL_EVERY = 0.5  # safety net for missed events: hashing a small file twice a second is cheap
RETRY_WATCH = 1.0  # seconds before watching again after the watch failed
MAX_SIZE = 4 * 1024 * 1024  # bytes hashed at most; the loader refuses bigger files anyway

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
        max_size: int = MAX_SIZE,
    ) -> None:
        self.path = os.path.abspath(path)
        # Not realpath: a ConfigMap's real file lives in a `..<timestamp>` dir that is replaced.
        self.directory = os.path.dirname(self.path)
        self.reload = reload
        self.debounce = debounce
        self.poll_every = poll_every
        self.max_size = max_size  # the app updates it when a reload changes max_config_size
        self._last_digest = known if known is not None else file_digest(self.path, max_size)
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

    async def _digest(self) -> str | None:
        return await asyncio.to_thread(file_digest, self.path, self.max_size)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every)
            try:
                if await self._digest() != self._last_digest:
                    self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # MemoryError included: the watch must outlive any one read
                log.exception("checking %s failed; still watching", self.path)

    async def _apply(self) -> None:
        while True:
            try:
                await self._apply_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reloading %s failed; still watching", self.path)
                await asyncio.sleep(self.debounce)

    async def _apply_once(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # let a burst of writes settle
            # Clear before reading: an event from now on means "read again", never "lost".
            self._dirty.clear()
            reasons, self._reasons = self._reasons, []
            digest = await self._digest()
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


def file_digest(path: str, max_size: int = MAX_SIZE) -> str | None:
    """The digest the config loader records as `source_hash` (None if missing or unreadable).

    Blocking: call it in a thread. Something that is not a regular file, or is bigger than
    `max_size`, is never read: its digest comes from its type, size and mtime (a change still
    shows, and the reload that follows reports why the file is refused)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_size:
            return f"unreadable:{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with os.fdopen(fd, "rb") as f:
                fd = -1
                return hashlib.sha256(f.read(max_size + 1)).hexdigest()[:12]
        finally:
            if fd >= 0:
                os.close(fd)
    except OSError:
        return None
