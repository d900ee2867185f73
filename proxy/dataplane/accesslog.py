"""JSON access log: one line per request, buffered and flushed off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dataplane.request import Request

FLUSH_INTERVAL = 0.2
FLUSH_BYTES = 64 * 1024
# Printable ASCII but the quote and the backslash: JSON needs no escape for it, so json.dumps (the costliest
# part of a line) is only called for the rare path or request id with anything else in it.
_PLAIN = re.compile(rb'[ !#-\[\]-~]*')
# One line, formatted in one call (the fields and their order are documented in README.md).
_LINE = (
    '{"time":%.3f,"method":"%s","path":%s,"status":%d,"route":%s,"upstream":%s,'
    '"duration_ms":%.2f,"bytes":%d,"request_id":%s,"client":"%s"}\n'
)


class AccessLogger:
    """Collects formatted lines in memory; a timer writes them out in one call."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.lines: list[str] = []
        self.size = 0
        self._task: asyncio.Task[None] | None = None
        self._names: dict[str, str] = {}  # route and upstream names, JSON-quoted once

    def record(self, req: Request, now: float, upstream: str) -> None:
        """Format one request's line (called once per finished request)."""
        names = self._names
        route = names.get(req.route)
        if route is None:
            route = names[req.route] = json.dumps(req.route)
        up = names.get(upstream)
        if up is None:
            up = names[upstream] = json.dumps(upstream)
        line = _LINE % (
            time.time(),
            req.method.decode("latin-1"),
            _quoted(req.path, "utf-8"),
            req.status,
            route,
            up,
            (now - req.t0) * 1000 if req.t0 else 0.0,
            req.sent,
            _quoted(req.reqid or b"", "latin-1"),
            req.peer.decode("latin-1"),
        )
        self.lines.append(line)
        self.size += len(line)
        if self.size > FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write out the collected lines (the timer, a full buffer, shutdown)."""
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



def _quoted(raw: bytes, encoding: str) -> str:
    """`raw` as a JSON string, exactly as json.dumps(raw.decode(encoding, "replace")) writes it."""
    if _PLAIN.fullmatch(raw) is not None:
        return '"' + raw.decode("ascii") + '"'
    return json.dumps(raw.decode(encoding, "replace"))
