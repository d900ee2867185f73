"""Recording one exchange's outcome: request counters by route and status class, the upstream's
latency histogram and analysis window (what the rollout decides on), outlier detection per
endpoint, the retry budget, mirrors left behind, and the access log line.
"""

from __future__ import annotations

import logging

from proxy.dataplane.context import PlaneContext
from proxy.dataplane.pools import EndpointPool
from proxy.dataplane.request import Request

log = logging.getLogger("canary_proxy.dataplane")


def record_failure(ctx: PlaneContext, req: Request, kind: int) -> None:
    """Record one failed attempt against the upstream and endpoint that failed."""
    if req.track is not None:
        _end_try(req)
    binding = req.binding
    if binding is None:
        return
    us = binding.upstream.stats
    us.errors[kind] += 1
    now = ctx.clock.read()
    us.observe(ctx.clock.wall(now), now - req.t0, True)  # the same clocks as finish()
    req.failed = True
    if req.pool is not None:
        endpoint_failed(ctx, req, binding.upstream.name, req.pool, now)


def endpoint_failed(ctx: PlaneContext, req: Request, upstream: str, pool: EndpointPool, now: float) -> None:
    """Outlier detection: count a failure (connect/reset/timeout or a 5xx) against an endpoint."""
    if pool.record_failure(req.snapshot.config.outlier_detection, now):
        ctx.stats.ejections[upstream] = ctx.stats.ejections.get(upstream, 0) + 1
        log.warning("endpoint %s of %s ejected for %.0fs", pool.endpoint.key, upstream, pool.ejected_until - now)


def finish(ctx: PlaneContext, req: Request, aborted: bool, log: bool = True) -> None:
    """Record a finished exchange (response written, or the client gone). `log=False`: the
    access log line comes later (a tunnel's, when it ends: see log_access)."""
    stats = ctx.stats
    stats.in_flight -= 1
    if req.mirror is not None:
        ctx.mirrors.drop(req)  # the body never completed
    if req.track is not None:
        _end_try(req)
    if req.retries:
        ctx.retrying -= 1
    if req.connecting is not None:
        req.connecting.cancel()
        req.connecting = None
    status = req.status
    binding = req.binding
    now = ctx.clock.read()
    if binding is not None and status:
        binding.counts.by_class[status // 100] += 1
        error = req.snapshot.is_error[status]
        grpc = req.grpc_status
        if grpc >= 0:  # an HTTP/2 upstream's gRPC answer: its grpc-status may make it an error
            stats.count_grpc(binding.upstream.name, grpc)
            if req.snapshot.grpc_error[grpc]:
                error = True
        if not req.failed and not aborted:
            binding.upstream.stats.observe(ctx.clock.wall(now), now - req.t0, error)
            pool = req.pool
            if pool is not None:
                if status >= 500 or (grpc > 0 and error):
                    endpoint_failed(ctx, req, binding.upstream.name, pool, now)
                else:
                    pool.consecutive_failures = 0
    elif status:
        req.snapshot.unmatched.by_class[status // 100] += 1
    log_ = ctx.access_log
    if log_ is not None and log:
        log_.record(req, now, binding.upstream.name if binding is not None else "")


def log_access(ctx: PlaneContext, req: Request) -> None:
    """Write `req`'s access log line now (a tunnel that ended: its bytes are known)."""
    log_ = ctx.access_log
    if log_ is not None:
        binding = req.binding
        log_.record(req, ctx.clock.read(), binding.upstream.name if binding is not None else "")


def _end_try(req: Request) -> None:
    """The try `req.track` counts as outstanding is over."""
    us = req.track
    if us is not None:
        req.track = None
        us.try_ended(req.track_key)
