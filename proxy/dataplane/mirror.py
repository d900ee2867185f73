"""Request mirroring (shadow traffic): `routes[].mirror: {to, percent, max_body, analyze}`.

A chosen share of a route's requests is copied to the mirror upstream once the request body is
complete; the mirror's response is read and thrown away. Nothing here can delay, fail or change the
user's exchange:

- the mirror has its own connections (never the primary's pools), opened and read by tasks that are
  owned by :class:`Mirrors` (a bounded set, cancelled on close; no fire-and-forget);
- at most `max_in_flight` mirrors (buffering or sending) exist at once; beyond that a request is
  simply not mirrored (`canary_proxy_mirror_skipped_total{reason="overloaded"}`), so a hung mirror
  upstream costs a bounded amount of memory and sockets, never the user's latency;
- the copy of the body is buffered up to `max_body` while the body streams to the primary; a bigger
  body drops the copy (`reason="body_too_large"`). Memory is bounded by max_in_flight x max_body.

Mirrored requests carry `X-Canary-Proxy-Mirror: 1`; Host is left as the client sent it (the mirror
is normally the same application; Istio's `-shadow` Host suffix is not added).
With `analyze: true` each mirror result is also recorded as the mirror upstream's evidence for the
rollout analysis (a dark launch judged before any user sees the canary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from time import monotonic
from typing import TYPE_CHECKING, cast

import httptools

from proxy.analysis.stats import SKIP_OVERLOADED, SKIP_TOO_LARGE
from proxy.dataplane.mirror_rule import MirrorJob, MirrorRule

if TYPE_CHECKING:
    from proxy.config.model import Endpoint, UpstreamTLS
    from proxy.dataplane.request import Request

log = logging.getLogger("canary_proxy.mirror")

MAX_IN_FLIGHT = 256  # mirrors buffering or on the wire, per process
MAX_IDLE = MAX_IN_FLIGHT  # pooled idle connections per mirror endpoint (no more than mirrors in flight)
MIRROR_HEADER = b"X-Canary-Proxy-Mirror: 1\r\n"


class _Exchange:
    """One copy on the wire: what is needed to record it, and to send it again once (fresh)."""

    __slots__ = ("head_only", "key", "payload", "retry", "rule", "t0", "timer")

    def __init__(self, rule: MirrorRule, key: str, payload: bytes, head_only: bool, t0: float) -> None:
        self.rule = rule
        self.key = key
        self.payload = payload
        self.head_only = head_only
        self.t0 = t0
        self.retry = True  # a pooled connection that turns out closed: once more on a new one
        self.timer: asyncio.TimerHandle | None = None


class _MirrorConnection(asyncio.Protocol):
    """One connection to a mirror endpoint, one exchange at a time: keeps the response's status,
    discards everything else. A protocol with callbacks, not streams and a task per copy: a
    mirror copy must cost little CPU on the loop it shares with the users' requests."""

    def __init__(self, owner: Mirrors) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.status = 0
        self.keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        # With a status: a body framed by the connection's end; without: reset before a response.
        self._finish(False, reset=not self.status)

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.close()  # nobody asked: a pooled connection must stay silent
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.status = 0
            self._finish(False)
            self.close()

    def on_headers_complete(self) -> None:
        status: int = self.parser.get_status_code()
        if status >= 200 or status == 101:  # 1xx: the final response follows
            self.status = status
            ex = self.exchange
            if ex is not None and ex.head_only:  # a HEAD response has no body, whatever it says
                self._finish(False)

    def on_message_complete(self) -> None:
        if self.status:
            self._finish(bool(self.parser.should_keep_alive()))

    def _finish(self, keep_alive: bool, reset: bool = False) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None:
            self.keep_alive = keep_alive and not ex.head_only
            self.owner.finished(self, ex, self.status, reset)

    def send(self, ex: _Exchange) -> None:
        """Write one request; :meth:`Mirrors.finished` hears how it ended."""
        assert self.transport is not None
        self.status = 0
        self.keep_alive = False
        self.exchange = ex
        self.transport.write(ex.payload)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self, reset: bool = False) -> None:
        """Close the connection (`reset`: at once, dropping what is unsent)."""
        t = self.transport
        if t is not None:
            if reset:
                t.abort()
            else:
                t.close()

    def timed_out(self) -> None:
        """The copy took longer than timeouts.response: give up (no second try), count no response."""
        if self.exchange is not None:
            self.exchange.retry = False
        self.close(reset=True)


class Mirrors:
    """Every mirror of one process: admission, body copies, its own connection pool, its tasks."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self.pending = 0  # admitted copies not finished yet (buffering, connecting or on the wire)
        self.tasks: set[asyncio.Task[None]] = set()  # connects in progress
        self.busy: set[_MirrorConnection] = set()  # connections with a copy on the wire
        self.idle: dict[str, list[_MirrorConnection]] = {}
        self.closed = False
        self.tls: dict[UpstreamTLS, ssl.SSLContext] = {}  # https:// mirrors: the pools' contexts

    # -- called by the data plane (cheap, synchronous) -------------------------------------------

    def begin(self, req: Request, rule: MirrorRule) -> None:
        """Admit `req` for mirroring (its head is parsed and routed), or count why not."""
        if req.clen > rule.max_body:
            rule.stats.skipped[SKIP_TOO_LARGE] += 1
            return
        if self.pending >= self.max_in_flight or self.closed:
            rule.stats.skipped[SKIP_OVERLOADED] += 1
            return
        self.pending += 1
        req.mirror = MirrorJob(rule)

    def body(self, req: Request, chunk: bytes) -> None:
        """A piece of the request body (already forwarded or queued for the primary)."""
        job = req.mirror
        if job is None:
            return
        job.size += len(chunk)
        if job.size > job.rule.max_body:
            job.rule.stats.skipped[SKIP_TOO_LARGE] += 1
            job.chunks = []
            self.drop(req)
            return
        job.chunks.append(chunk)

    def complete(self, req: Request) -> None:
        """The request body is complete: send the copy (on a pooled connection, or connect first)."""
        job = req.mirror
        if job is None:
            return
        req.mirror = None
        if self.closed:
            self.pending -= 1
            return
        body = b"".join(job.chunks)
        job.chunks = []
        if req.te is not None:  # the head says chunked: one chunk, then the end
            body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
        rule = job.rule
        endpoint = rule.pick()
        ex = _Exchange(
            rule, endpoint.pool_key, req.head[:-2] + MIRROR_HEADER + b"\r\n" + body, req.method == b"HEAD", monotonic()
        )
        conn = self._take(ex.key)
        if conn is not None:
            self._start(conn, ex)
        else:
            self._connect(ex, endpoint)

    def drop(self, req: Request) -> None:
        """Forget the copy of a request that will not complete (client gone, error, too large)."""
        if req.mirror is not None:
            req.mirror = None
            self.pending -= 1

    # -- the exchange ---------------------------------------------------------------------------

    def _connect(self, ex: _Exchange, endpoint: Endpoint) -> None:
        task = asyncio.get_running_loop().create_task(self._open(ex, endpoint))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, ex: _Exchange, endpoint: Endpoint) -> None:
        ex.retry = False
        loop = asyncio.get_running_loop()
        try:
            tls = endpoint.tls
            async with asyncio.timeout(ex.rule.connect_timeout):
                if tls is None:
                    host, port = endpoint.host, endpoint.port
                    _, conn = await loop.create_connection(lambda: _MirrorConnection(self), host, port)
                else:
                    ctx = self.tls.get(tls)
                    if ctx is None:  # never fall back to cleartext
                        raise ConnectionRefusedError(f"no TLS context for https://{endpoint.key}")
                    _, conn = await loop.create_connection(
                        lambda: _MirrorConnection(self),
                        endpoint.host,
                        endpoint.port,
                        ssl=ctx,
                        server_hostname=tls.server_name or endpoint.host,
                    )
        except (OSError, TimeoutError):
            self._record(ex, 0)
            return
        except asyncio.CancelledError:
            self.pending -= 1  # closing
            raise
        if self.closed:
            conn.close()
            self.pending -= 1
            return
        self._start(conn, ex)

    def _start(self, conn: _MirrorConnection, ex: _Exchange) -> None:
        self.busy.add(conn)
        ex.timer = asyncio.get_running_loop().call_later(ex.rule.timeout, conn.timed_out)
        conn.send(ex)

    def finished(self, conn: _MirrorConnection, ex: _Exchange, status: int, reset: bool) -> None:
        """Called by the connection when its copy ended: a status, or 0 (no response)."""
        self.busy.discard(conn)
        if ex.timer is not None:
            ex.timer.cancel()
        if status and conn.keep_alive and not self.closed and conn.usable():
            idle = self.idle.setdefault(ex.key, [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        if reset and ex.retry and not self.closed:
            # A pooled connection the mirror had closed while idle: once more, on a new one.
            endpoint = next((e for e in ex.rule.endpoints if e.pool_key == ex.key), None)
            if endpoint is not None:
                self._connect(ex, endpoint)
                return
        self._record(ex, status)

    def _record(self, ex: _Exchange, status: int) -> None:
        self.pending -= 1
        rule = ex.rule
        duration = monotonic() - ex.t0
        rule.stats.observe(status, duration)
        evidence = rule.evidence
        if evidence is not None:
            evidence.observe(time.time(), duration, status == 0 or rule.is_error[status])

    def _take(self, key: str) -> _MirrorConnection | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    async def close(self) -> None:
        """Stop every mirror in flight and close the pool (shutdown: nothing of the user's is lost)."""
        self.closed = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for conn in list(self.busy):
            conn.close(reset=True)  # its copy is recorded as failed by connection_lost
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
