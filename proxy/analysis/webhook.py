"""Rollout events to an HTTP webhook: JSON POSTs from one worker task, retried with backoff.

`send` never blocks and never raises: the data plane and the controller must not wait for a
webhook receiver. Events are delivered in order; a full queue drops the oldest event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

log = logging.getLogger("canary_proxy.rollout")

SessionFactory = Callable[[], aiohttp.ClientSession]
Sleep = Callable[[float], Awaitable[None]]


class WebhookSender:
    """Posts queued events to `url`; `attempts` tries each, waiting base_delay * 2**n between."""

    def __init__(
        self,
        url: str,
        session_factory: SessionFactory | None = None,
        *,
        attempts: int = 5,
        base_delay: float = 0.5,
        timeout: float = 5.0,
        max_queue: int = 1000,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.url = url
        self._session_factory = session_factory
        self._attempts = max(attempts, 1)
        self._base_delay = base_delay
        self._timeout = timeout
        self._sleep = sleep
        self._queue: deque[dict[str, object]] = deque(maxlen=max_queue)
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.delivered = 0
        self.failed = 0

    async def start(self) -> None:
        """Start the worker (also started lazily by the first `send` inside a running loop)."""
        self._ensure_worker()

    def send(self, event: Mapping[str, object]) -> None:
        """Queue one event (JSON-serialisable) for delivery."""
        if self._closed:
            return
        if len(self._queue) == self._queue.maxlen:
            log.warning("webhook queue full, dropping the oldest event for %s", self.url)
        self._queue.append(dict(event))
        self._wakeup.set()
        self._ensure_worker()

    @property
    def pending(self) -> int:
        """Events not delivered (or given up on) yet."""
        return len(self._queue)

    async def close(self) -> None:
        """Stop the worker (undelivered events are dropped) and close the session."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_worker(self) -> None:
        if self._worker is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: start() will pick the queue up
        self._worker = loop.create_task(self._run(), name=f"webhook {self.url}")

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            event = self._queue[0]
            ok = await self._deliver(event)
            if self._queue and self._queue[0] is event:
                self._queue.popleft()
            if ok:
                self.delivered += 1
            else:
                self.failed += 1

    def _encode(self, event: Mapping[str, object]) -> tuple[bytes, dict[str, str]]:
        """The request body and headers for `event` (subclasses shape and sign it)."""
        return json.dumps(event).encode("utf-8"), {"Content-Type": "application/json"}

    async def _deliver(self, event: dict[str, object]) -> bool:
        body, headers = self._encode(event)
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                await self._sleep(self._base_delay * 2 ** (attempt - 1))
            try:
                session = self._get_session()
                async with session.post(
                    self.url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return True
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        log.warning(
            "webhook %s gave up on event %r after %d attempts: %s",
            self.url,
            event.get("event"),
            self._attempts,
            last,
        )
        return False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        return self._session
