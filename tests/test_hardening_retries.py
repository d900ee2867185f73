"""Retry rules, each against real upstreams over real sockets:

* nothing sent yet (connect refused): retried on another endpoint, or for the canary on the
  baseline, whatever the method;
* the request was sent, then the connection died: only idempotent methods are retried;
* the first response byte went out: never retried (the client sees a truncated response);
* retries in flight stay within the budget: max(min_concurrent, budget_percent of requests in flight).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
from conftest import (
    LoggingUpstream,
    RawClient,
    RawUpstream,
    config_text,
    free_port,
    read_head,
    read_request,
    wait_until,
)

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]

# Checks off: a few proven canary failures would trip the verdict (min_requests no longer holds it).
ROLLOUT = (
    "rollout: {canary: canary, baseline: stable,\n"
    "  thresholds: {max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}}\n"
)
CANARY = b"x-canary: always\r\n"


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def status_of(app: ProxyApp, data: bytes) -> tuple[int, bytes]:
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    try:
        resp = await client.request(data)
        return resp.status, resp.body
    finally:
        client.close()


def retries(app: ProxyApp, upstream: str) -> int:
    return app.stats.retries.get(upstream, 0)


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_refused_canary_is_retried_on_the_baseline(
    method: bytes, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await logging_upstream()
    app = await proxy_factory(config_text(stable.url, dead_url(), extra=ROLLOUT))
    body = b"Content-Length: 4\r\n\r\nbody" if method == b"POST" else b"\r\n"
    status, got = await status_of(app, method + b" /c HTTP/1.1\r\nHost: h\r\n" + CANARY + body)
    assert (status, got) == (200, b"/c")
    assert stable.urls() == [b"/c"]
    assert retries(app, "stable") == 1
    assert app.stats.upstreams["canary"].errors[0] == 1  # the connect failure still counts for the canary


# PUT is idempotent, but its body was streamed and not kept: it cannot be replayed.
@pytest.mark.parametrize(
    ("method", "retried"), [(b"GET", True), (b"DELETE", True), (b"PUT", False), (b"POST", False), (b"PATCH", False)]
)
async def test_reset_after_the_request_was_sent_retries_only_idempotent_methods(
    method: bytes, retried: bool, raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    got: list[bytes] = []

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append((await read_request(reader)).start)
        rst(writer)

    bad, good = await raw_upstream(resetting), await logging_upstream()
    # Two endpoints, round-robin from the second: the first request lands on `bad`.
    app = await proxy_factory(config_text(f"{good.url}, {bad.url}", good.url))
    body = b"" if method in (b"GET", b"DELETE") else b"Content-Length: 2\r\n\r\nhi"
    status, _ = await status_of(app, method + b" /r HTTP/1.1\r\nHost: h\r\n" + (body or b"\r\n"))
    assert len(got) == 1  # it reached the failing endpoint
    if retried:
        assert status == 200 and good.urls() == [b"/r"] and retries(app, "stable") == 1
    else:
        assert status == 502 and good.requests == [] and retries(app, "stable") == 0


async def test_post_to_canary_reset_after_send_is_not_replayed_on_the_baseline(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        rst(writer)

    canary, stable = await raw_upstream(resetting), await logging_upstream()
    app = await proxy_factory(config_text(stable.url, canary.url, extra=ROLLOUT))
    post = b"POST /p HTTP/1.1\r\nHost: h\r\n" + CANARY + b"Content-Length: 2\r\n\r\nhi"
    assert (await status_of(app, post))[0] == 502
    get = b"GET /g HTTP/1.1\r\nHost: h\r\n" + CANARY + b"\r\n"
    assert await status_of(app, get) == (200, b"/g")  # the GET is replayed on the baseline
    assert stable.urls() == [b"/g"]


async def test_never_retried_after_the_first_response_byte(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.1)
        rst(writer)

    bad, good = await raw_upstream(partial), await logging_upstream()
    app = await proxy_factory(config_text(f"{good.url}, {bad.url}", good.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    start, _, _ = await read_head(client.reader)
    assert start == b"HTTP/1.1 200 OK"
    try:
        rest = await client.at_eof()
    except ConnectionResetError:
        rest = b""
    client.close()
    assert len(rest) < 100  # truncated, and the client can tell
    assert good.requests == [] and retries(app, "stable") == 0


@pytest.mark.parametrize("attempts", [0, 2])
async def test_attempts_is_the_number_of_retries(
    attempts: int, raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """Three endpoints, two of them resetting every request: `attempts: 2` reaches the good one,
    `attempts: 0` never retries. The budget is released when the request ends."""

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        rst(writer)

    bad1, bad2, good = await raw_upstream(resetting), await raw_upstream(resetting), await logging_upstream()
    extra = f"retries: {{attempts: {attempts}}}\noutlier_detection: {{consecutive_failures: 0}}\n"
    # Round-robin starts at the second endpoint: bad1, then bad2, then good.
    app = await proxy_factory(config_text(f"{good.url}, {bad1.url}, {bad2.url}", good.url, extra=extra))
    status, _ = await status_of(app, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status == (200 if attempts == 2 else 502)
    assert bad1.accepted == 1 and bad2.accepted == (1 if attempts else 0)
    assert retries(app, "stable") == attempts
    assert app.plane is not None and app.plane.retrying == 0


async def test_no_retry_when_attempts_is_zero(logging_upstream: LogFactory, proxy_factory: ProxyFactory) -> None:
    good = await logging_upstream()
    app = await proxy_factory(config_text(f"{good.url}, {dead_url()}", good.url, extra="retries: {attempts: 0}\n"))
    statuses = sorted([(await status_of(app, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))[0] for _ in range(2)])
    assert statuses == [200, 502]


class Gate:
    """A raw upstream that holds every request until released, then resets it (`fail`) or answers."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.waiting = 0
        self.release = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        self.waiting += 1
        await self.release.wait()
        if self.fail:
            rst(writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()


async def test_retry_budget_bounds_retries_under_concurrency(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    """20 GETs in flight, 10 of them fail at once: the budget is max(3, 20% of 20) = 4 retries."""
    bad_gate, good_gate = Gate(fail=True), Gate(fail=False)
    bad, good = await raw_upstream(bad_gate), await raw_upstream(good_gate)
    extra = (
        "retries: {attempts: 1, budget_percent: 20, min_concurrent: 3}\noutlier_detection: {consecutive_failures: 0}\n"
    )
    app = await proxy_factory(config_text(f"{good.url}, {bad.url}", good.url, extra=extra))
    assert app.plane is not None
    clients = [await RawClient.connect(app.plane.bound_port) for _ in range(20)]
    for c in clients:
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: bad_gate.waiting == 10 and good_gate.waiting == 10, what="20 requests held upstream")
    assert app.stats.in_flight == 20
    bad_gate.release.set()
    await wait_until(lambda: good_gate.waiting == 14, what="the retries in budget reaching the good endpoint")
    good_gate.release.set()
    statuses = sorted([(await c.response()).status for c in clients])
    for c in clients:
        c.close()
    assert statuses == [200] * 14 + [502] * 6
    assert retries(app, "stable") == 4
    await wait_until(lambda: app.plane is not None and app.plane.retrying == 0 and app.stats.in_flight == 0)


async def test_canary_failover_to_the_baseline_is_not_held_back_by_the_budget(
    raw_upstream: RawFactory, logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    """10 canary GETs in flight die at once (the canary process crashed) with a budget of 1: every
    one still fails over to the baseline."""
    gate = Gate(fail=True)
    canary, stable = await raw_upstream(gate), await logging_upstream()
    extra = ROLLOUT + "retries: {attempts: 1, budget_percent: 0, min_concurrent: 1}\n"
    app = await proxy_factory(config_text(stable.url, canary.url, extra=extra))
    assert app.plane is not None
    clients = [await RawClient.connect(app.plane.bound_port) for _ in range(10)]
    for i, c in enumerate(clients):
        await c.send(b"GET /f%d HTTP/1.1\r\nHost: h\r\nx-canary: always\r\n\r\n" % i)
    await wait_until(lambda: gate.waiting == 10, what="10 canary requests held")
    gate.release.set()
    statuses = [(await c.response()).status for c in clients]
    for c in clients:
        c.close()
    assert statuses == [200] * 10
    assert sorted(stable.urls()) == sorted(b"/f%d" % i for i in range(10))
    assert retries(app, "stable") == 10
