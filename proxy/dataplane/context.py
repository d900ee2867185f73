"""What the data plane's parts share within one process, as narrow objects.

:class:`PlaneContext` is the state the exchange, the legs and the sweeper read and update (the
current snapshot, counters, pools, live connections, the clock). :class:`ClientSide` is what the
exchange and the sweeper may ask of a client leg. Both live here, below the exchange and the legs,
so that neither has to import the other's module.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.analysis.faults import LocalErrors
from proxy.dataplane.clock import Clock
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import UpstreamLeg
from proxy.dataplane.mirror import Mirrors
from proxy.dataplane.pools import PoolFactory, PoolRegistry

if TYPE_CHECKING:
    from proxy.analysis.stats import Stats
    from proxy.dataplane.accesslog import AccessLogger
    from proxy.dataplane.request import Request
    from proxy.dataplane.snapshot import Snapshot


class ClientSide(Protocol):
    """A client leg, as the exchange (answers, truncation, handing over a connection), the sweeper
    (deadlines, vanished clients) and the drain see it. Protocol-neutral: no wire format here."""

    peer: bytes
    closed: bool
    queued: bool  # in the end-of-iteration flush list
    current: Request | None  # the request being proxied
    deadline: float
    dkind: int  # what `deadline` means (0: nothing)
    paused: int
    write_blocked_at: float

    def respond_error(self, req: Request, status: int) -> None: ...

    def upstream_ready(self, leg: UpstreamLeg) -> None: ...

    def pause_reading_for(self, reason: int) -> None: ...

    def is_idle(self) -> bool: ...

    def on_timeout(self, now: float) -> None: ...

    def check_gone(self) -> None: ...

    def flush_queued(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Flushable(Protocol):
    """A connection with writes deferred to the end of the loop iteration."""

    queued: bool

    def flush_queued(self) -> None: ...


class PlaneContext:
    """The data plane's shared state; :class:`proxy.dataplane.plane.DataPlane` adds the lifecycle."""

    snapshot: Snapshot  # set by swap() before start()

    def __init__(
        self,
        stats: Stats,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[..., asyncio.BaseProtocol],
        rng: Callable[[], float] = random.random,
        h2_pool: PoolFactory | None = None,
    ) -> None:
        self.stats = stats
        self.loop = loop
        self.clock = Clock()
        self.rng = rng
        self.pools = PoolRegistry(self, factory, h2_pool)
        self.mirrors = Mirrors()  # shadow traffic: its own pool and bounded task set
        self.clients: set[ClientSide] = set()
        self.tunnels: set[ClientSide] = set()
        self.upstream_conns: set[UpstreamLeg] = set()
        self.draining = False
        self.scheme = b"http"  # the listener's, for X-Forwarded-Proto: b"https" behind `tls:`
        self.access_log: AccessLogger | None = None
        self.retrying = 0  # requests being retried (the retry budget counts them)
        self.local = LocalErrors(stats.local_errors)  # our own faults (proxy.analysis.faults)
        self.fd_clients = 1 << 30  # client connections the descriptor limit carries (set at start)
        self.last_id = 0
        self.id_prefix = os.urandom(4).hex().encode() + b"-"
        # Via: our pseudonym (b"": Via off) and the lines we add; the default is per instance
        # (set again from the bound address once listening, see DataPlane.start).
        self.via_default = H.VIA_TOKEN
        self.via_configured: str | None = None
        self.via = H.VIA_TOKEN
        self.via_line = H.via_line(self.via)
        self.via_line10 = H.via_line(self.via, True)
        self._flushes: list[Flushable] = []  # deferred writes, see ClientConnection.flush_later

    def admit(self) -> bool:
        """A new client connection (already in `clients`) may stay: within max_connections and
        the descriptor budget, so that upstream connects never run out of descriptors first."""
        n = len(self.clients)
        if n > self.snapshot.config.limits.max_connections:
            return False
        if n > self.fd_clients:
            self.local.record("descriptors", "accept", f"{n} client connections reach the descriptor budget")
            return False
        # Room for this client's upstream connection too: idle pooled connections give way first.
        short = n + len(self.upstream_conns) + 1 - 2 * self.fd_clients
        if short > 0 and self.pools.trim_idle(short) < short:
            self.local.record("descriptors", "accept", "no descriptor left for an upstream connection")
            return False
        return True

    def set_via(self, configured: str | None) -> None:
        """`via:` unset: this instance's own `canary-proxy-XXXXXX`; "": no Via at all (and no
        loop detection)."""
        self.via_configured = configured
        token = self.via_default if configured is None else configured.encode("ascii")
        self.via = token
        self.via_line = H.via_line(token)
        self.via_line10 = H.via_line(token, True)

    def via_line_for(self, version10: bool) -> bytes:
        """The Via line for a message of this version (b"" when Via is off)."""
        return self.via_line10 if version10 else self.via_line

    def new_request_id(self) -> bytes:
        """An X-Request-Id for a request that came without one."""
        self.last_id += 1
        return self.id_prefix + b"%x" % self.last_id

    def queue_flush(self, client: Flushable) -> None:
        """Have `client.flush_queued()` called once the loop has handled this round of events."""
        if not self._flushes:
            self.loop.call_soon(self._flush_all)
        self._flushes.append(client)

    def _flush_all(self) -> None:
        flushes, self._flushes = self._flushes, []
        for client in flushes:
            if client.queued:
                client.flush_queued()
