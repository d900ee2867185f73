"""The data plane's lifecycle: listen, swap snapshots, drain, close.

Per request the work is in :mod:`proxy.dataplane.exchange` (what happens) and the legs in
:mod:`proxy.dataplane.legs` (how it is spoken); deadlines are swept by :mod:`proxy.dataplane.deadlines`.
This object is their shared :class:`~proxy.dataplane.context.PlaneContext`: it holds the one
snapshot reference that reloads and rollout decisions swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.analysis.stats import Stats
from proxy.config.model import UpstreamTLS
from proxy.dataplane import deadlines
from proxy.dataplane.context import PlaneContext
from proxy.dataplane.h2_pool import H2Pool
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.http1_client import ClientConnection
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.snapshot import Snapshot


class DataPlane(PlaneContext):
    """The listener and the lifecycle around the shared data-plane state."""

    def __init__(
        self, stats: Stats, loop: asyncio.AbstractEventLoop, rng: Callable[[], float] = random.random
    ) -> None:
        super().__init__(stats, loop, UpstreamConnection, rng, H2Pool)
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        """Listen and start the deadline sweeper. `tls`: terminate TLS with this (dispatcher) context;
        a client that has not completed its handshake within `handshake_timeout` is dropped."""
        if tls is not None:
            self.scheme = b"https"
            if sock is not None:
                self.server = await self.loop.create_server(
                    lambda: ClientConnection(self),
                    sock=sock,
                    backlog=4096,
                    ssl=tls,
                    ssl_handshake_timeout=handshake_timeout,
                )
            else:
                self.server = await self.loop.create_server(
                    lambda: ClientConnection(self),
                    host,
                    port,
                    reuse_port=reuse_port or None,
                    backlog=4096,
                    ssl=tls,
                    ssl_handshake_timeout=handshake_timeout,
                )
        elif sock is not None:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=4096
            )
        else:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, reuse_port=reuse_port or None, backlog=4096
            )
        self._sweeper = self.loop.create_task(deadlines.sweep(self))
        server: Any = self.server  # uvloop's `sockets` is a list (see bound_port)
        bound = server.sockets[0].getsockname()  # port 0 resolved; the same in every worker
        self.via_default = H.default_pseudonym(socket.gethostname(), f"{bound[0]}:{bound[1]}")
        self.set_via(self.via_configured)

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        server: Any = self.server  # uvloop's `sockets` is a list where typeshed says tuple (mypyc checks)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def set_upstream_tls(self, contexts: dict[UpstreamTLS, ssl.SSLContext]) -> None:
        """The client contexts of `https://` endpoints, for new upstream and mirror connections."""
        self.pools.set_tls(contexts)
        self.mirrors.tls = contexts

    def swap(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current. In-flight requests keep the one they started with."""
        self.snapshot = snapshot
        self.set_via(snapshot.config.via)
        keys = {ep.pool_key for up in snapshot.config.upstreams.values() for ep in up.endpoints}
        self.pools.retain(keys)

    async def drain(self, grace: float) -> bool:
        """Stop accepting, let in-flight requests finish (up to `grace` s); True if all finished."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = self.loop.time() + grace
        while True:
            for c in list(self.clients):
                if c.is_idle():
                    c.close()  # idle keep-alive: nothing to lose
            if not self.clients or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        clean = not self.clients
        for c in list(self.clients):
            if c.current is not None:
                self.local.record("shutdown", "shutdown", "shutdown_grace ended with the request in flight")
            c.abort()
        return clean

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for c in list(self.clients):
            c.abort()
        await self.mirrors.close()
        self.pools.close_all()
        for u in list(self.upstream_conns):
            u.abort()
