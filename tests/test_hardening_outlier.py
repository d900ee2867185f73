"""Passive outlier ejection per endpoint, with real failing endpoints: consecutive failures eject,
the ejection grows with each repeat (capped), traffic avoids an ejected endpoint, a success resets
the count, and an upstream is never left without an endpoint (panic mode sends to all)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
from conftest import LoggingUpstream, RawClient, RawUpstream, config_text, read_request, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    rst(writer)


async def get(app: ProxyApp, path: bytes = b"/") -> int:
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    try:
        return (await client.request(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)).status
    finally:
        client.close()


async def metrics(app: ProxyApp) -> str:
    assert app.admin is not None
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{app.admin.bound_port}/metrics") as r:
        return await r.text()


async def test_consecutive_failures_eject_for_a_growing_time(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    bad, good = await raw_upstream(resetting), await logging_upstream()
    extra = "outlier_detection: {consecutive_failures: 3, base_ejection_time: 1s, max_ejection_time: 1500ms}\n"
    app = await proxy_factory(config_text(f"{good.url}, {bad.url}", good.url, extra=extra))
    assert app.plane is not None
    loop = asyncio.get_running_loop()
    pool = app.plane.pools.pools[f"127.0.0.1:{bad.port}"]
    # Every request that lands on `bad` is retried on `good`: the client never sees the failures.
    statuses = [await get(app) for _ in range(6)]
    assert statuses == [200] * 6
    assert bad.accepted == 3 and pool.ejections == 1
    assert 0.5 < pool.ejected_until - loop.time() <= 1.0
    assert app.stats.ejections == {"stable": 1}
    assert 'canary_proxy_upstream_ejections_total{upstream="stable"} 1.0' in await metrics(app)
    # While ejected, `bad` gets nothing.
    assert [await get(app) for _ in range(6)] == [200] * 6
    assert bad.accepted == 3
    # Back after the ejection time; three more failures eject it again, for longer (capped at max).
    await wait_until(lambda: pool.ejected_until <= loop.time(), timeout=3, what="ejection over")
    for _ in range(6):
        assert await get(app) == 200
    assert bad.accepted == 6 and pool.ejections == 2
    assert 1.0 < pool.ejected_until - loop.time() <= 1.5


async def test_a_success_resets_the_consecutive_count(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    flaky_calls = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal flaky_calls
        while True:
            await read_request(reader)
            flaky_calls += 1
            if flaky_calls % 2:
                rst(writer)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(flaky)
    extra = "outlier_detection: {consecutive_failures: 2}\nretries: {attempts: 0}\n"
    app = await proxy_factory(config_text(up.url, up.url, extra=extra))
    assert app.plane is not None
    statuses = [await get(app) for _ in range(8)]
    assert statuses == [502, 200] * 4  # fail, succeed, ...: never two in a row, never ejected
    assert app.plane.pools.pools[f"127.0.0.1:{up.port}"].ejections == 0


async def test_never_all_endpoints_at_once(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    """Both endpoints fail until ejected: requests still reach them (panic mode), so the upstream
    answers 502 from its endpoints, never a 503 for having nothing to send to, and recovers as soon
    as an endpoint does."""
    healthy = False

    async def switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if not healthy:
                rst(writer)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    a, b = await raw_upstream(switch), await raw_upstream(switch)
    extra = "outlier_detection: {consecutive_failures: 1, base_ejection_time: 60s}\nretries: {attempts: 0}\n"
    app = await proxy_factory(config_text(f"{a.url}, {b.url}", a.url, extra=extra))
    assert app.plane is not None
    assert [await get(app) for _ in range(4)] == [502] * 4
    pools = app.plane.snapshot.upstreams["stable"].balancer.pools
    assert all(p.ejections >= 1 for p in pools)  # both ejected...
    assert a.accepted + b.accepted == 4  # ...and still tried
    healthy = True
    assert await get(app) == 200  # no 60 s outage


async def test_ejected_canary_goes_to_the_baseline(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """A single-endpoint canary, ejected: its requests still reach it first (panic mode, so the
    rollout analysis keeps seeing its errors), and its failed GETs are retried on the baseline."""
    canary, stable = await raw_upstream(resetting), await logging_upstream()
    extra = (
        "rollout: {canary: canary, baseline: stable, fast_fail: {consecutive_errors: 0},\n"
        "  thresholds: {max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}}\n"
        "outlier_detection: {consecutive_failures: 2, base_ejection_time: 60s}\n"
    )
    app = await proxy_factory(config_text(stable.url, canary.url, extra=extra))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    for i in range(5):
        resp = await client.request(b"GET /c%d HTTP/1.1\r\nHost: h\r\nx-canary: always\r\n\r\n" % i)
        assert resp.status == 200
    client.close()
    assert stable.urls() == [b"/c%d" % i for i in range(5)]
    # Ejected after the 2nd failure; the 3 failures while ejected (panic mode) do not eject it again.
    assert canary.accepted == 5 and app.stats.ejections.get("canary") == 1
    assert app.stats.upstreams["canary"].errors[2] == 5  # every reset counted against the canary


async def test_failures_while_ejected_do_not_eject_again(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """Panic-mode traffic to an ejected single endpoint: one ejection, one log line, not one per
    `consecutive_failures` failed requests."""
    canary, stable = await raw_upstream(resetting), await logging_upstream()
    extra = (
        "rollout: {canary: canary, baseline: stable, fast_fail: {consecutive_errors: 0},\n"
        "  thresholds: {max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}}\n"
        "outlier_detection: {consecutive_failures: 2, base_ejection_time: 60s}\n"
        "retries: {attempts: 0}\n"
    )
    app = await proxy_factory(config_text(stable.url, canary.url, extra=extra))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    statuses = []
    for i in range(20):
        resp = await client.request(b"GET /c%d HTTP/1.1\r\nHost: h\r\nx-canary: always\r\n\r\n" % i)
        statuses.append(resp.status)
        if resp.status != 200:
            client.close()
            client = await RawClient.connect(app.plane.bound_port)
    client.close()
    assert canary.accepted == 20  # panic mode: the only endpoint still gets its traffic
    assert statuses == [502] * 20
    assert app.stats.ejections.get("canary") == 1
