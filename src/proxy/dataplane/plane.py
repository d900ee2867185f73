"""The data plane: listener, current snapshot, pools, dispatch/retry, recording, deadlines, drain.

Client connections call into this object for everything that needs process-wide state; it holds the
one snapshot reference that reloads and rollout decisions swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from time import monotonic
from typing import Any, cast

from proxy.analysis.faults import LocalErrors, local_kind
from proxy.analysis.stats import KIND_CONNECT, KIND_TIMEOUT, Stats
from proxy.dataplane import forwarding
from proxy.dataplane.accesslog import AccessLogger
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import P_CONNECT, UpstreamLeg
from proxy.dataplane.legs.http1_client import ClientConnection
from proxy.dataplane.legs.http1_upstream import UpstreamConnection
from proxy.dataplane.mirror import MirrorRule, Mirrors
from proxy.dataplane.pools import EndpointPool, PoolRegistry
from proxy.dataplane.request import Request
from proxy.routing.router import RequestView, select
from proxy.routing.snapshot import Binding, Snapshot

log = logging.getLogger("canary_proxy.dataplane")

SWEEP_INTERVAL = 0.25


class DataPlane:
    """Everything the client and upstream legs share within one process."""

    snapshot: Snapshot  # set by swap() before start()

    def __init__(
        self, stats: Stats, loop: asyncio.AbstractEventLoop, rng: Callable[[], float] = random.random
    ) -> None:
        self.stats = stats
        self.loop = loop
        self.loop_time = loop.time
        self.now = monotonic()
        self.rng = rng
        self.pools = PoolRegistry(self, UpstreamConnection)
        self.mirrors = Mirrors()  # shadow traffic: its own pool and bounded task set
        self.clients: set[ClientConnection] = set()
        self.tunnels: set[ClientConnection] = set()
        self.upstream_conns: set[UpstreamLeg] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self.access_log: AccessLogger | None = None
        self.retrying = 0
        self.local = LocalErrors(stats.local_errors)
        self.fd_clients = 1 << 30  # client connections the descriptor limit carries (set at start)
        self._last_id = 0
        self._flushes: list[ClientConnection] = []  # deferred writes, see ClientConnection.flush_later
        self._id_prefix = os.urandom(4).hex().encode() + b"-"
        # Via: our pseudonym (b"": Via off) and the lines we add.
        self.via = H.VIA_TOKEN
        self.via_line = H.via_line(self.via)
        self.via_line10 = H.via_line(self.via, True)
        self._sweeper: asyncio.Task[None] | None = None
        # time.time() - time.monotonic(), refreshed by the sweeper: wall-clock stamps for the
        # analysis windows without a second clock read per request.
        self.wall_offset = time.time() - monotonic()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> None:
        """Listen and start the deadline sweeper."""
        if sock is not None:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=4096
            )
        else:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, reuse_port=reuse_port or None, backlog=4096
            )
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        server: Any = self.server  # uvloop's `sockets` is a list where typeshed says tuple (mypyc checks)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def swap(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current. In-flight requests keep the one they started with."""
        self.snapshot = snapshot
        self._set_via(snapshot.config.via)
        keys = {ep.key for up in snapshot.config.upstreams.values() for ep in up.endpoints}
        self.pools.retain(keys)

    def _set_via(self, configured: str | None) -> None:
        """`via:` unset: `canary-proxy`; "": no Via at all (and no loop detection)."""
        token = H.VIA_TOKEN if configured is None else configured.encode("ascii")
        self.via = token
        self.via_line = H.via_line(token)
        self.via_line10 = H.via_line(token, True)

    def via_line_for(self, version10: bool) -> bytes:
        """The Via line for a message of this version (b"" when Via is off)."""
        return self.via_line10 if version10 else self.via_line

    def new_request_id(self) -> bytes:
        """An X-Request-Id for a request that came without one."""
        self._last_id += 1
        return self._id_prefix + b"%x" % self._last_id

    async def drain(self, grace: float) -> bool:
        """Stop accepting, let in-flight requests finish (up to `grace` s); True if all finished."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = self.loop.time() + grace
        while True:
            for c in list(self.clients):
                if c.current is None and c.req is None and not c.queue and c.tunnel is None:
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

    def queue_flush(self, client: ClientConnection) -> None:
        """Have `client.flush_queued()` called once the loop has handled this round of events."""
        if not self._flushes:
            self.loop.call_soon(self._flush_all)
        self._flushes.append(client)

    def _flush_all(self) -> None:
        flushes, self._flushes = self._flushes, []
        for client in flushes:
            if client.queued:
                client.flush_queued()

    # -- per request -----------------------------------------------------------------------------

    def route_and_limit(self, req: Request, client: ClientConnection) -> int | None:
        """Route `req` (its head is complete) and build the upstream head; returns the body limit."""
        snap = req.snapshot
        view = RequestView(req.method, req.path, req.query, req.rhdrs, req.host)
        picked = select(snap.rules, view, self.rng)
        limit = snap.config.limits.max_body_size
        if picked is not None:
            rule, binding = picked
            req.route = rule.name
            req.binding = binding
            route_limit = snap.config.routes[rule.index].max_body_size
            if route_limit is not None:
                limit = route_limit
            issued = view.issued
            if issued is not None and rule.sticky_cookie is not None and rule.issue is not None:
                req.set_cookie = rule.sticky_cookie + b"=" + issued + rule.issue
            mirror = rule.mirror
            if mirror is not None:
                self._mirror(req, mirror, binding)
        req.head = self._head(req, client, snap)
        return limit

    def _mirror(self, req: Request, mirror: object, binding: Binding | None) -> None:
        """Admit a copy of `req` for the route's mirror (a share of requests, never upgrades, never
        a request already going to the mirror's upstream)."""
        assert isinstance(mirror, MirrorRule)
        if req.upgrade is not None or (binding is not None and binding.upstream.name == mirror.upstream):
            return
        if mirror.percent >= 100 or self.rng() * 100 < mirror.percent:
            self.mirrors.begin(req, mirror)

    def _head(self, req: Request, client: ClientConnection, snap: Snapshot) -> bytes:
        """The upstream head (see :mod:`proxy.dataplane.forwarding`); settles the request id, the
        Upgrade passed on and, behind trusted proxies, the client address for the access log."""
        peer = client.peer
        trusted = forwarding.is_trusted(peer, snap.trusted)
        if trusted and req.xff is not None:
            req.peer = forwarding.client_address(req.xff, snap.trusted, peer)
        if req.reqid is None:
            self._last_id += 1
            req.reqid = self._id_prefix + b"%x" % self._last_id
        req.upgrade = forwarding.forwarded_upgrade(req)
        default_host = None
        if req.host is None and req.binding is not None and req.binding.upstream.balancer.pools:
            default_host = req.binding.upstream.balancer.pools[0].endpoint.key.encode()
        via = self.via_line10 if req.version10 else self.via_line
        return forwarding.upstream_head(req, peer, trusted, default_host, via)

    def dispatch(self, req: Request, client: ClientConnection) -> None:
        """Send `req` to an endpoint of its bound upstream."""
        binding = req.binding
        if binding is None:
            client.respond_error(req, 404 if not req.route else 503)
            return
        # An ejected canary still gets its first attempts (panic mode): diverting them to the
        # baseline would hide its errors from the rollout analysis. Retries fail over instead.
        pool = binding.upstream.balancer.pick(req.t0)  # monotonic(): the loop clock's origin
        if pool is None:
            client.respond_error(req, 503)
            return
        self._send(req, client, pool)

    def _send(self, req: Request, client: ClientConnection, pool: EndpointPool, fresh: bool = False) -> None:
        req.pool = pool
        binding = req.binding
        if binding is not None:
            us = binding.upstream.stats
            if us.track_inflight and req.track is None:
                req.track_key = us.try_started(req.t0)
                req.track = us
            # The canary's idempotent tries get their own timeout when a retry can follow: a hung
            # canary falls back to the baseline fast.
            retryable = req.method in H.IDEMPOTENT and req.retries < req.snapshot.config.retries.attempts
            req.try_timeout = us.try_timeout if us.try_timeout and retryable else 0.0
        conn = None if fresh else pool.take_idle()
        if conn is not None:
            client.upstream_ready(conn)
            return
        client.pause_reading_for(P_CONNECT)
        client.connect_task = self.loop.create_task(self._connect(req, client, pool))

    async def _connect(self, req: Request, client: ClientConnection, pool: EndpointPool) -> None:
        try:
            conn = await pool.connect(req.snapshot.config.timeouts.connect)
            self.now = monotonic()
        except TimeoutError:
            client.connect_task = None
            self.upstream_error(req, client, KIND_CONNECT)
            client.upstream_failed(req, KIND_CONNECT, 504)
        except OSError as exc:
            client.connect_task = None
            local = local_kind(exc)
            if local is not None:  # our own limit, not the upstream's fault: never blame it
                self.local_failure(req, client, local, f"{pool.endpoint.key}: {exc}")
                return
            self.upstream_error(req, client, KIND_CONNECT)
            client.upstream_failed(req, KIND_CONNECT, 502)
        else:
            client.connect_task = None
            if client.closed or client.current is not req:
                pool.release(conn, True, req.snapshot.config.timeouts.idle)
            else:
                client.upstream_ready(conn)

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

    def local_failure(self, req: Request, client: ClientConnection, kind: str, cause: str) -> None:
        """A failure of this proxy's own (proxy.analysis.faults): counted and logged, answered 503."""
        self.local.record(kind, "connect", cause)
        req.failed = True  # finish() then keeps it out of the analysis and outlier detection
        if req is not client.current or client.closed:
            return
        client.upstream = None
        if req.status:
            client.abort()
        else:
            client.respond_error(req, 503)

    def upstream_error(self, req: Request, client: ClientConnection, kind: int) -> None:
        """Record one failed attempt against the upstream and endpoint that failed."""
        binding = req.binding
        if req.track is not None:
            _end_try(req)
        if binding is None:
            return
        now = self.loop.time()
        us = binding.upstream.stats
        us.errors[kind] += 1
        now = monotonic()
        us.observe(now + self.wall_offset, now - req.t0, True)  # the same clocks as finish()
        req.failed = True
        if req.pool is not None:
            self._endpoint_failed(req, binding.upstream.name, req.pool, now)

    def _endpoint_failed(self, req: Request, upstream: str, pool: EndpointPool, now: float) -> None:
        """Outlier detection: count a failure (connect/reset/timeout or a 5xx) against an endpoint."""
        if pool.record_failure(req.snapshot.config.outlier_detection, now):
            self.stats.ejections[upstream] = self.stats.ejections.get(upstream, 0) + 1
            log.warning("endpoint %s of %s ejected for %.0fs", pool.endpoint.key, upstream, pool.ejected_until - now)

    def retry(self, req: Request, client: ClientConnection, kind: int, reused: bool = False) -> bool:
        """Try another endpoint (or, for the canary, the baseline) if that is safe and in budget.

        A request that failed on a pooled connection (`reused`) may also go to the same endpoint
        over a new connection: the old one most likely went stale while idle.

        `retries.attempts` is the number of retries per request (0: none at all). A request being
        retried counts once against the budget (`retrying`) until it finishes. A canary request
        failing over to its baseline is not held back by the budget: that load is bounded by the
        canary's share, and a dead canary must not cost users errors."""
        if req.status or req.body_forwarded or req.binding is None:
            return False
        snap = req.snapshot
        cfg = snap.config.retries
        if req.retries >= cfg.attempts:
            return False
        if req.attempts and kind != KIND_CONNECT and req.method not in H.IDEMPOTENT:
            return False  # the request was sent: it may have reached the application
        upstream = req.binding.upstream
        now = self.loop.time()
        # A canary try that timed out goes to the baseline: its other endpoints may hang as well.
        pool = None if kind == KIND_TIMEOUT else upstream.balancer.pick(now, exclude=req.pool)
        fresh = False
        fallback = None
        if pool is None or pool.ejected_until > now:
            # No other healthy endpoint: the canary's baseline, else (a stale pooled connection)
            # the same endpoint over a new connection. The baseline comes first: when the canary
            # process died, its pooled connections are all "stale" and a new one is refused.
            fallback = snap.fallback.get(upstream.name)
            pool = fallback.balancer.pick(now) if fallback is not None else None
            if pool is None:
                fallback = None
                if not reused or req.pool is None:
                    return False
                pool, fresh = req.pool, True
        if not req.retries and fallback is None:
            budget = max(cfg.min_concurrent, self.stats.in_flight * cfg.budget_percent / 100)
            if self.retrying >= budget:
                return False
        if fallback is not None:
            req.binding = Binding(fallback, self.stats.route_counts_for(req.route, fallback.name))
            upstream = fallback
        if not req.retries:
            self.retrying += 1
        req.retries += 1
        req.failed = False
        self.stats.retries[upstream.name] = self.stats.retries.get(upstream.name, 0) + 1
        self._send(req, client, pool, fresh)
        return True

    def finish(self, req: Request, aborted: bool, log: bool = True) -> None:
        """Record a finished exchange (response written, or the client gone). `log=False`: the
        access log line comes later (a tunnel's, when it ends: see log_access)."""
        stats = self.stats
        stats.in_flight -= 1
        if req.mirror is not None:
            self.mirrors.drop(req)  # the body never completed
        if req.track is not None:
            _end_try(req)
        if req.retries:
            self.retrying -= 1
        status = req.status
        binding = req.binding
        now = monotonic()
        if binding is not None and status:
            binding.counts.by_class[status // 100] += 1
            if not req.failed and not aborted:
                binding.upstream.stats.observe(now + self.wall_offset, now - req.t0, req.snapshot.is_error[status])
                pool = req.pool
                if pool is not None:
                    if status >= 500:
                        self._endpoint_failed(req, binding.upstream.name, pool, self.loop.time())
                    else:
                        pool.consecutive_failures = 0
        elif status:
            req.snapshot.unmatched.by_class[status // 100] += 1
        log_ = self.access_log
        if log_ is not None and log:
            log_.record(req, now, binding.upstream.name if binding is not None else "")

    def log_access(self, req: Request) -> None:
        """Write `req`'s access log line now (a tunnel that ended: its bytes are known)."""
        log_ = self.access_log
        if log_ is not None:
            binding = req.binding
            log_.record(req, monotonic(), binding.upstream.name if binding is not None else "")

    def upstream_timeout(self, conn: UpstreamLeg) -> None:
        client = cast(ClientConnection | None, conn.client)
        if client is None:
            conn.close()
            return
        req = client.current
        conn.client = None
        conn.abort()
        if req is None or client.upstream is not conn:
            return
        self.upstream_error(req, client, KIND_TIMEOUT)
        client.upstream = None
        if req.status:
            client.abort()
        elif req.try_timeout:
            client.upstream_failed(req, KIND_TIMEOUT, 504)  # the canary's try timed out: the baseline may answer
        else:
            client.respond_error(req, 504)

    # -- deadlines -------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Enforce deadlines without a timer per request: a coarse periodic scan."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.wall_offset = time.time() - monotonic()
            now = self.now = monotonic()
            send_timeout = self.snapshot.config.timeouts.send
            for c in list(self.clients):
                if c.dkind and c.deadline <= now:
                    c.on_timeout(now)
                elif c.write_blocked_at and now - c.write_blocked_at > send_timeout:
                    c.abort()
                elif c.paused and c.current is not None:
                    c.check_gone()
            for u in list(self.upstream_conns):
                if u.deadline and u.deadline <= now:
                    u.deadline = 0.0
                    self.upstream_timeout(u)


def _end_try(req: Request) -> None:
    """The try `req.track` counts as outstanding is over."""
    us = req.track
    if us is not None:
        req.track = None
        us.try_ended(req.track_key)
