"""JSON access log: one line per request, buffered and flushed off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dataplane.request import Request

FLUSH_INTERVAL = 0.2
FLUSH_BYTES = 64 * 1024


class AccessLogger:
    """Collects formatted lines in memory; a timer writes them out in one call."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.lines: list[str] = []
        self.size = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, req: Request, now: float, upstream: str) -> None:
        """Format one request's line (called once per finished request)."""
        path = req.path.decode("utf-8", "replace")
        line = (
            f'{{"time":{time.time():.3f},"method":"{req.method.decode("latin-1")}","path":{json.dumps(path)},'
            f'"status":{req.status},"route":{json.dumps(req.route)},"upstream":{json.dumps(upstream)},'
            f'"duration_ms":{(now - req.t0) * 1000 if req.t0 else 0.0:.2f},"bytes":{req.sent},'
            f'"request_id":{json.dumps((req.reqid or b"").decode("latin-1"))},'
            f'"client":"{req.peer.decode("latin-1")}"}}\n'
        )
        self.lines.append(line)
        self.size += len(line)
        if self.size > FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = "".join(self.lines)
        self.lines = []
        self.size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the proxy down

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

