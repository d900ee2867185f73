"""Deadlines without a timer per request: one coarse periodic sweep over live connections.

Each connection keeps one deadline and what it means (header, body, idle, linger for a client;
response or idle for an upstream connection); the sweep compares them with the plane's clock.
"""

from __future__ import annotations

import asyncio

from proxy.dataplane.context import PlaneContext

SWEEP_INTERVAL = 0.25


def sweep_once(ctx: PlaneContext) -> None:
    """Act on every deadline that has passed, and on clients that vanished while paused."""
    ctx.clock.sync_wall()
    now = ctx.clock.read()
    send_timeout = ctx.snapshot.config.timeouts.send
    for c in list(ctx.clients):
        if c.dkind and c.deadline <= now:
            c.on_timeout(now)
        elif c.write_blocked_at and now - c.write_blocked_at > send_timeout:
            c.abort()
        elif c.paused and c.current is not None:
            c.check_gone()
    for u in list(ctx.upstream_conns):
        if u.deadline and u.deadline <= now:
            u.deadline = 0.0
            client = u.client
            if client is None:
                u.close()  # idle too long in its pool
            else:
                client.upstream_timed_out(u)


async def sweep(ctx: PlaneContext) -> None:
    """Run :func:`sweep_once` every :data:`SWEEP_INTERVAL` seconds until cancelled."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        sweep_once(ctx)
