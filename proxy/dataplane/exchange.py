"""One request's life, owned in one place: route, pick an endpoint, acquire or connect, send,
stream the response back, release; or fail.

The legs report events (a head was parsed, a connection is ready or lost, a response ended) and
call these functions; the functions decide what happens next and record it. Every failed upstream
attempt goes through :func:`fail`, which applies the documented rules (README, "HTTP behaviour"):
retry when that is safe and within budget, else 502 (504 for timeouts) while nothing of the
response reached the client, else truncate. The exchange knows routing, retries and recording; it
never sees a byte of the wire format (that is the legs' and :mod:`proxy.dataplane.forwarding`'s).
"""

from __future__ import annotations

import asyncio

from proxy.analysis.faults import local_kind
from proxy.analysis.stats import KIND_CONNECT, KIND_RESET, KIND_TIMEOUT
from proxy.dataplane import forwarding, recording
from proxy.dataplane.context import ClientSide, PlaneContext
from proxy.dataplane.legs import http1_headers as H
from proxy.dataplane.legs.base import P_CONNECT
from proxy.dataplane.mirror_rule import MirrorRule
from proxy.dataplane.pools import EndpointPool
from proxy.dataplane.request import Request
from proxy.dataplane.snapshot import Binding
from proxy.dataplane.tls.client import log_upstream_failure, tls_failure
from proxy.routing.router import RequestView, select

# Failures after which a retry may be tried: the connection failed or was reset. A timeout or an
# invalid response means the upstream had the request and may have acted on it.
RETRYABLE = frozenset({KIND_CONNECT, KIND_RESET})


def route(ctx: PlaneContext, req: Request, peer: bytes) -> int | None:
    """Route `req` (its head is complete) and build its upstream head; returns the body limit."""
    snap = req.snapshot
    view = RequestView(req.method, req.path, req.query, req.rhdrs, req.host)
    picked = select(snap.rules, view, ctx.rng)
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
            _mirror(ctx, req, mirror, binding)
    trusted = forwarding.is_trusted(peer, snap.trusted)
    if trusted and req.xff is not None:
        req.peer = forwarding.client_address(req.xff, snap.trusted, peer)
    if req.reqid is None:
        req.reqid = ctx.new_request_id()
    req.upgrade = forwarding.forwarded_upgrade(req)
    default_host = None
    if req.host is None and req.binding is not None and req.binding.upstream.balancer.pools:
        default_host = req.binding.upstream.balancer.pools[0].endpoint.key.encode()
    req.head = forwarding.upstream_head(req, peer, trusted, default_host, ctx.via_line_for(req.version10), ctx.scheme)
    return limit


def _mirror(ctx: PlaneContext, req: Request, mirror: object, binding: Binding | None) -> None:
    """Admit a copy of `req` for the route's mirror (a share of requests, never upgrades, never
    a request already going to the mirror's upstream)."""
    assert isinstance(mirror, MirrorRule)
    if req.upgrade is not None or (binding is not None and binding.upstream.name == mirror.upstream):
        return
    if mirror.percent >= 100 or ctx.rng() * 100 < mirror.percent:
        ctx.mirrors.begin(req, mirror)


def begin(ctx: PlaneContext, client: ClientSide, req: Request) -> None:
    """The client leg starts proxying `req` (its head is parsed; its body may still be arriving)."""
    ctx.stats.in_flight += 1
    if req.error:
        client.respond_error(req, req.error)
        return
    binding = req.binding
    if binding is None:
        client.respond_error(req, 404 if not req.route else 503)
        return
    # An ejected canary still gets its first attempts (panic mode): diverting them to the
    # baseline would hide its errors from the rollout analysis. Retries fail over instead.
    pool = binding.upstream.balancer.pick(req.t0)
    if pool is None:
        client.respond_error(req, 503)
        return
    _send(ctx, client, req, pool)


def _send(ctx: PlaneContext, client: ClientSide, req: Request, pool: EndpointPool, fresh: bool = False) -> None:
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
    req.connecting = ctx.loop.create_task(_connect(ctx, client, req, pool))


async def _connect(ctx: PlaneContext, client: ClientSide, req: Request, pool: EndpointPool) -> None:
    try:
        conn = await pool.connect(req.snapshot.config.timeouts.connect)
        ctx.clock.read()
    except TimeoutError:
        req.connecting = None
        fail(ctx, client, req, KIND_CONNECT, 504)
    except OSError as exc:
        req.connecting = None
        local = local_kind(exc)
        if local is not None:  # our own limit, not the upstream's fault: never blame it
            fail_local(ctx, client, req, local, f"{pool.endpoint.key}: {exc}")
            return
        if pool.ssl is not None:  # a bad certificate is the upstream's fault, and worth a line
            why = tls_failure(exc)
            if why is not None and req.binding is not None:
                log_upstream_failure(req.binding.upstream.name, pool.endpoint.key, why)
        fail(ctx, client, req, KIND_CONNECT, 502)
    else:
        req.connecting = None
        if client.closed or client.current is not req:
            pool.release(conn, True, req.snapshot.config.timeouts.idle)
        else:
            client.upstream_ready(conn)


def fail(ctx: PlaneContext, client: ClientSide, req: Request, kind: int, status: int, reused: bool = False) -> None:
    """The one place a failed upstream attempt ends: record it, then retry, answer `status` (502 or
    504), or truncate the response that had started. The caller (a leg) has already let go of the
    failed connection. `reused`: that connection came from the idle pool (it may have gone stale)."""
    recording.record_failure(ctx, req, kind)
    if req is not client.current or client.closed:
        return  # the client is gone or has moved on: nobody to answer
    # A canary try that hit its own (shorter) timeout may go to the baseline (canary_try_timeout).
    retryable = kind in RETRYABLE or (kind == KIND_TIMEOUT and req.try_timeout > 0.0)
    if retryable and retry(ctx, client, req, kind, reused):
        return
    if req.status:  # the response had started: the client must see a truncated response
        client.abort()
    else:
        client.respond_error(req, status)


def fail_local(ctx: PlaneContext, client: ClientSide, req: Request, kind: str, cause: str) -> None:
    """A failure of this proxy's own (proxy.analysis.faults): counted and logged, answered 503,
    never recorded against the upstream (no analysis, no outlier detection) and never retried."""
    ctx.local.record(kind, "connect", cause)
    req.failed = True  # finish() then keeps it out of the analysis and outlier detection
    if req is not client.current or client.closed:
        return
    if req.status:
        client.abort()
    else:
        client.respond_error(req, 503)


def may_retry(req: Request, kind: int, attempts_allowed: int) -> bool:
    """The retry rules that depend on the request alone: never after the response started or the
    body was streamed on, at most `retries.attempts` times, and once the request was sent only
    for idempotent methods (it may have reached the application) unless the connection failed."""
    if req.status or req.body_forwarded or req.binding is None:
        return False
    if req.retries >= attempts_allowed:
        return False
    return not (req.attempts and kind != KIND_CONNECT and req.method not in H.IDEMPOTENT)


def retry(ctx: PlaneContext, client: ClientSide, req: Request, kind: int, reused: bool = False) -> bool:
    """Try another endpoint (or, for the canary, the baseline) if that is safe and in budget.

    A request that failed on a pooled connection (`reused`) may also go to the same endpoint
    over a new connection: the old one most likely went stale while idle.

    `retries.attempts` is the number of retries per request (0: none at all). A request being
    retried counts once against the budget (`retrying`) until it finishes. A canary request
    failing over to its baseline is not held back by the budget: that load is bounded by the
    canary's share, and a dead canary must not cost users errors."""
    snap = req.snapshot
    cfg = snap.config.retries
    if not may_retry(req, kind, cfg.attempts) or req.binding is None:
        return False
    upstream = req.binding.upstream
    now = ctx.clock.now
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
        budget = max(cfg.min_concurrent, ctx.stats.in_flight * cfg.budget_percent / 100)
        if ctx.retrying >= budget:
            return False
    if fallback is not None:
        req.binding = Binding(fallback, ctx.stats.route_counts_for(req.route, fallback.name))
        upstream = fallback
    if not req.retries:
        ctx.retrying += 1
    req.retries += 1
    req.failed = False
    ctx.stats.retries[upstream.name] = ctx.stats.retries.get(upstream.name, 0) + 1
    _send(ctx, client, req, pool, fresh)
    return True


def cancel_connect(req: Request) -> None:
    """The client went away while a connection was being opened for `req`."""
    task: asyncio.Task[None] | None = req.connecting
    if task is not None:
        req.connecting = None
        task.cancel()
