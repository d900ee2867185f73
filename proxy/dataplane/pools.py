"""Per-endpoint keep-alive pools with passive outlier ejection, kept across reloads by `host:port`.

Protocol-neutral: a pool holds upstream legs (:class:`proxy.dataplane.legs.base.UpstreamLeg`) and
makes new ones with the factory it is given; it never parses or writes a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Protocol, cast

from proxy.config.model import Endpoint, OutlierDetection, UpstreamTLS
from proxy.dataplane.clock import Clock
from proxy.dataplane.legs.base import UpstreamLeg

ConnectionFactory = Callable[["EndpointPool"], asyncio.BaseProtocol]
PoolFactory = Callable[[Endpoint, "DataPlaneLike", ConnectionFactory], "EndpointPool"]


class DataPlaneLike(Protocol):
    """What pools need from the data plane."""

    upstream_conns: set[UpstreamLeg]
    clock: Clock


class EndpointPool:
    """Idle keep-alive connections to one endpoint, plus its outlier-ejection state."""

    def __init__(self, endpoint: Endpoint, plane: DataPlaneLike, factory: ConnectionFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory  # makes the leg (protocol object) for a new connection
        self.host = endpoint.host
        self.port = endpoint.port
        self.plane = plane
        self.idle: list[UpstreamLeg] = []
        self.retired = False  # endpoint removed by a reload: drain, then close
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.connects = 0  # connections opened (for tests and /status)
        # https:// endpoints: the client context (set by PoolRegistry.set_tls) and the SNI name.
        self.ssl: ssl.SSLContext | None = None
        tls = endpoint.tls
        self.server_hostname: str | None = None if tls is None else tls.server_name or endpoint.host

    def take_idle(self) -> UpstreamLeg | None:
        """A pooled connection that is still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing():
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamLeg:
        """Open a new connection (raises OSError / TimeoutError)."""
        loop = asyncio.get_running_loop()
        factory = self.factory
        ctx = self.ssl
        if ctx is None and self.endpoint.tls is not None:  # never fall back to cleartext
            raise ConnectionRefusedError(f"no TLS context for https://{self.endpoint.key}")
        async with asyncio.timeout(timeout):
            if ctx is None:
                _, conn = await loop.create_connection(lambda: factory(self), self.host, self.port)
            else:  # the timeout covers the TLS handshake too
                _, conn = await loop.create_connection(
                    lambda: factory(self), self.host, self.port, ssl=ctx, server_hostname=self.server_hostname
                )
        self.connects += 1
        return cast(UpstreamLeg, conn)  # the factory makes legs

    def release(self, conn: UpstreamLeg, reusable: bool, idle_timeout: float) -> None:
        """Give a connection back after a complete exchange."""
        conn.client = None
        conn.started = False
        conn.released()
        t = conn.transport
        if not reusable or self.retired or t is None or t.is_closing():
            conn.close()
            return
        conn.deadline = self.plane.clock.now + idle_timeout
        self.idle.append(conn)

    def forget(self, conn: UpstreamLeg) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def retire(self) -> None:
        """Stop reusing this endpoint: close idle connections; busy ones close when done."""
        self.retired = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    # -- passive outlier detection (Envoy-style consecutive failures) ----------------------------

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, od: OutlierDetection, now: float) -> bool:
        """Count a failure; returns True when this failure ejects the endpoint.

        Failures while ejected (panic-mode traffic) do not count: like Envoy, an ejected endpoint
        is not ejected again until it is back, so its ejection time grows once per ejection, not
        once per handful of failed requests (which also logged a warning every few milliseconds)."""
        if self.ejected_until > now:
            return False
        self.consecutive_failures += 1
        if od.consecutive_failures and self.consecutive_failures >= od.consecutive_failures:
            self.ejections += 1
            self.consecutive_failures = 0
            self.ejected_until = now + min(od.base_ejection_time * self.ejections, od.max_ejection_time)
            return True
        return False


class PoolRegistry:
    """Endpoint pools by `host:port`, kept across reloads so unchanged endpoints keep their
    connections; balancers are rebuilt per snapshot."""

    def __init__(self, plane: DataPlaneLike, factory: ConnectionFactory, h2_pool: PoolFactory | None = None) -> None:
        self.plane = plane
        self.factory = factory
        self.pools: dict[str, EndpointPool] = {}  # by Endpoint.pool_key
        self.tls: dict[UpstreamTLS, ssl.SSLContext] = {}  # client contexts of https:// endpoints
        self.h2_pool = h2_pool  # makes the pools of `protocol: h2` endpoints

    def pool_for(self, endpoint: Endpoint) -> EndpointPool:
        key = endpoint.pool_key
        pool = self.pools.get(key)
        if pool is None or pool.retired:
            make = self.h2_pool if endpoint.h2 and self.h2_pool is not None else EndpointPool
            pool = self.pools[key] = make(endpoint, self.plane, self.factory)
            if endpoint.tls is not None:
                pool.ssl = self.tls.get(endpoint.tls)
        return pool

    def set_tls(self, contexts: dict[UpstreamTLS, ssl.SSLContext]) -> None:
        """Use these client contexts for new connections (pooled ones keep theirs until closed)."""
        self.tls = contexts
        for pool in self.pools.values():
            tls = pool.endpoint.tls
            if tls is not None:
                pool.ssl = contexts.get(tls)

    def retain(self, keys: set[str]) -> None:
        """Retire (drain and close) every pool whose endpoint is no longer configured."""
        for key in list(self.pools):
            if key not in keys:
                self.pools.pop(key).retire()

    def close_all(self) -> None:
        for pool in self.pools.values():
            pool.retire()

    def trim_idle(self, n: int) -> int:
        """Close up to `n` idle pooled connections, oldest first (their descriptors are needed)."""
        closed = 0
        for pool in self.pools.values():
            while pool.idle and closed < n:
                pool.idle.pop(0).close()
                closed += 1
        return closed
