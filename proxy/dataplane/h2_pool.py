"""Connections to one HTTP/2 endpoint (`protocol: h2`), shared by concurrent requests.

Where an HTTP/1.1 pool hands out an idle connection, this pool hands out a stream: on a
connection with room under the server's MAX_CONCURRENT_STREAMS, else on a new connection. Requests
arriving together wait for the one connection being opened instead of each opening their own.
Outlier detection and everything else of :class:`proxy.dataplane.pools.EndpointPool` is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import cast

from proxy.config.model import Endpoint, UpstreamTLS
from proxy.dataplane.legs.base import UpstreamLeg
from proxy.dataplane.legs.h2_upstream import H2Upstream
from proxy.dataplane.pools import ConnectionFactory, DataPlaneLike, EndpointPool
from proxy.dataplane.tls.client import upstream_context


class H2Pool(EndpointPool):
    """One HTTP/2 endpoint: its connections live in `idle` (busy or not) while they take streams."""

    def __init__(self, endpoint: Endpoint, plane: DataPlaneLike, factory: ConnectionFactory) -> None:
        super().__init__(endpoint, plane, factory)
        self.opening: asyncio.Task[None] | None = None
        # https:// endpoints: a context like `ssl` (the upstream's `tls:` settings, set by the
        # registry and replaced on a certificate reload) but offering only "h2" by ALPN.
        self.h2_ssl: ssl.SSLContext | None = None
        self.h2_ssl_of: ssl.SSLContext | None = None

    def take_idle(self) -> UpstreamLeg | None:
        """A stream on a connection with room, or None (then :meth:`connect` opens one)."""
        for leg in self.idle:
            conn = cast(H2Upstream, leg)
            if conn.has_room():
                return conn.new_stream()
        return None

    async def connect(self, timeout: float) -> UpstreamLeg:
        """A stream on a new connection (or on the one being opened by a concurrent request)."""
        async with asyncio.timeout(timeout):
            while True:
                stream = self.take_idle()
                if stream is not None:
                    return stream
                task = self.opening
                if task is None:
                    task = self.opening = asyncio.get_running_loop().create_task(self._open())
                    task.add_done_callback(self._opened)
                await asyncio.shield(task)  # its failure (OSError) is every waiter's

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        tls = self.endpoint.tls
        if tls is None:
            _, conn = await loop.create_connection(lambda: H2Upstream(self), self.host, self.port)
        else:
            ctx = await self._context(tls)
            _, conn = await loop.create_connection(
                lambda: H2Upstream(self, b"https"), self.host, self.port, ssl=ctx, server_hostname=self.server_hostname
            )
            alpn = conn.alpn()
            if alpn != "h2":  # the server would read our HTTP/2 preface as garbage: refuse clearly
                conn.abort()
                raise ssl.SSLError(f"the server did not select h2 by ALPN (it chose {alpn or 'nothing'}; protocol: h2)")
        self.connects += 1
        if not self.retired:
            self.idle.append(conn)
        else:
            conn.close()

    async def _context(self, tls: UpstreamTLS) -> ssl.SSLContext:
        """The ALPN-h2 client context, rebuilt (off the loop: it reads files) whenever the registry
        hands this pool a new HTTP/1.1 context for the same settings (a config or file reload)."""
        base = self.ssl
        if base is None:  # never fall back to cleartext
            raise ConnectionRefusedError(f"no TLS context for https://{self.endpoint.key}")
        if self.h2_ssl is None or self.h2_ssl_of is not base:
            self.h2_ssl = await asyncio.to_thread(upstream_context, tls, ("h2",))
            self.h2_ssl_of = base
        return self.h2_ssl

    def _opened(self, task: asyncio.Task[None]) -> None:
        self.opening = None
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone

    def release(self, conn: UpstreamLeg, reusable: bool, idle_timeout: float) -> None:
        """A stream's exchange is over: it leaves its connection (which stays for other streams)."""
        conn.client = None
        conn.started = False
        conn.released()

    def retire(self) -> None:
        """Stop opening connections; each one closes gracefully once its streams are done."""
        self.retired = True
        task = self.opening
        if task is not None:
            task.cancel()
        for conn in list(self.idle):
            conn.close()
        with contextlib.suppress(ValueError):
            self.idle.clear()
