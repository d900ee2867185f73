"""Failures: unreachable, resetting, slow and broken upstreams; clients that vanish or stall; limits.
Every upstream here is a real socket server; the client is a raw socket."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from conftest import RawClient, RawUpstream, Upstream, config_text, free_port, read_head, read_request
from support.polling import holds, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_connection_refused_is_502(proxy_factory: ProxyFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = await proxy_factory(config_text(dead, dead))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert resp.status == 502 and resp.body == b"502 Bad Gateway\n"
    assert app.plane is not None and resp.get("via") == [b"1.1 " + app.plane.via]
    # A bodiless request that failed upstream leaves the client connection usable.
    resp = await client.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", method=b"HEAD")
    client.close()
    assert resp.status == 502


async def test_connect_failure_retries_another_endpoint(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    live = await upstream_factory("stable")
    dead = f"http://127.0.0.1:{free_port()}"
    app = await proxy_factory(config_text(f"{dead}, {live.url}", live.url))
    client = await RawClient.connect(port_of(app))
    statuses = [(await client.request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")).status]
    statuses += [(await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")).status for _ in range(3)]
    client.close()
    assert statuses == [200] * 4  # connect failures are safe to retry, whatever the method
    assert len(live.seen) == 4


@pytest.mark.parametrize("how", ["fin", "rst", "fin-after-head-bytes"])
async def test_upstream_gone_before_response_is_502(
    how: str, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if how == "rst":
            reset(writer)
        elif how == "fin-after-head-bytes":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
            await writer.drain()
            writer.close()
        else:
            writer.close()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    client.close()
    assert resp.status == 502
    assert b"Content-Len" not in resp.raw.split(b"\r\n\r\n")[0].replace(b"Content-Length", b"")
    assert up.accepted == 1  # POST whose request reached the upstream is not retried


async def test_response_timeout_is_504(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answer; wait for the proxy to give up
        closed.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {response: 1s}\nretries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    t0 = time.monotonic()
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    waited = time.monotonic() - t0
    client.close()
    assert resp.status == 504
    assert waited >= 0.9  # not before the configured timeout
    await asyncio.wait_for(closed.wait(), 2)  # and the upstream connection is dropped


async def test_slow_body_after_head_is_not_a_timeout(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    """The response timeout bounds the wait for the head and each pause in the body, not the whole body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.7)  # scenario: a slow upstream (under the 1 s response timeout)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        for b in (b"a", b"b", b"c"):
            await writer.drain()
            await asyncio.sleep(0.7)  # scenario: each pause in the body under the timeout, the total over it
            writer.write(b)
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {response: 1s}\n"))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.body == b"abc"


async def test_no_endpoint_is_503(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    assert app.plane is not None
    # An upstream left without endpoints (the balancer has nothing to pick).
    app.plane.snapshot.upstreams["stable"].balancer.pools = ()
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 503
    assert stable.seen == []


async def test_no_matching_route_is_404(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    routes = "  - name: api\n    match: {path_prefix: /api}\n    to: stable\n"
    app = await proxy_factory(config_text(stable.url, stable.url, routes=routes))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET /web HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 404 and stable.seen == []


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_dies_mid_body_truncates(
    framing: str, how: str, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # scenario: the upstream dies a moment after the first part of the body
        if how == "rst":
            reset(writer)
        else:
            writer.close()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    start, headers, _ = await read_head(client.reader)
    assert start == b"HTTP/1.1 200 OK"
    try:
        rest = await client.at_eof()  # the proxy closes the connection
    except ConnectionResetError:
        rest = b""
    client.close()
    if framing == "length":
        assert (b"Content-Length", b"1000") in headers
        assert len(rest) < 1000
    else:
        assert (b"Transfer-Encoding", b"chunked") in headers
        assert not rest.endswith(b"0\r\n\r\n")
        assert b"\r\n0\r\n" not in rest


async def test_invalid_chunk_mid_body_truncates(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # scenario: the invalid chunk comes in a later read than the valid one
        writer.write(b"zz\r\nGARBAGE\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_head(client.reader)
    try:
        rest = await client.at_eof()
    except ConnectionResetError:
        rest = b""
    client.close()
    assert b"GARBAGE" not in rest and b"0\r\n\r\n" not in rest


async def test_client_gone_mid_response_closes_upstream(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    upstream_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        try:
            await reader.read()  # EOF (or a reset) when the proxy drops the connection
        finally:
            upstream_closed.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_head(client.reader)
    await client.reader.readexactly(500)
    client.close()
    await asyncio.wait_for(upstream_closed.wait(), 1.0)
    plane = app.plane
    assert plane is not None
    await wait_until(lambda: plane.upstream_conns == set() and plane.clients == set(), 2.0, "both legs released")


async def test_client_gone_while_waiting_for_response(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    upstream_closed = asyncio.Event()
    got_request = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        got_request.set()
        try:
            await reader.read()
        finally:
            upstream_closed.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.wait_for(got_request.wait(), 2.0)  # the request is upstream, waiting for its answer
    client.close()
    await asyncio.wait_for(upstream_closed.wait(), 1.0)


async def test_slowloris_gets_408(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url, extra="timeouts: {client_header: 1s}\n"))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n")
    t0 = time.monotonic()
    got = b""
    for _ in range(30):  # a header byte every 100 ms: never completes the head
        await client.send(b"X")
        try:
            got = await asyncio.wait_for(client.reader.read(65536), 0.1)
            break
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
    got += await client.at_eof()
    client.close()
    assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
    assert b"Connection: close" in got
    assert 0.9 <= time.monotonic() - t0 < 3.0
    assert stable.seen == []


async def test_idle_keep_alive_connection_closed_after_first_request_timeout(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url, extra="timeouts: {idle: 1s}\n"))
    client = await RawClient.connect(port_of(app))
    assert (await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    assert await client.at_eof(timeout=3) == b""  # idle keep-alive: closed quietly
    client.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_max_body_size_413(
    chunked: bool, upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    completed: list[str] = []

    async def reader(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        completed.append(request.path)
        return web.Response(text=f"{len(body)}")

    stable = await upstream_factory("stable", handler=reader)
    routes = (
        "  - name: big\n    match: {path_prefix: /big}\n    to: stable\n    max_body_size: 4KiB\n"
        "  - name: default\n    to: stable\n"
    )
    app = await proxy_factory(
        config_text(stable.url, stable.url, extra="limits: {max_body_size: 1KiB}\n", routes=routes)
    )
    body = b"y" * 2000

    def request(path: bytes) -> bytes:
        if chunked:
            return b"POST %s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n%s\r\n0\r\n\r\n" % (
                path,
                body,
            )
        return b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n%s" % (path, body)

    client = await RawClient.connect(port_of(app))
    resp = await client.request(request(b"/big"))  # the route allows 4 KiB
    assert resp.status == 200 and resp.body == b"2000"
    resp = await client.request(request(b"/small"))
    assert resp.status == 413 and resp.get("connection") == [b"close"]
    assert await client.at_eof() == b""
    client.close()
    # A declared length is refused before anything is forwarded. A chunked body is only found too
    # large while it streams: a head sent in an earlier read may have been forwarded, but never a
    # complete request.
    if not chunked:
        await holds(lambda: [s["path"] for s in stable.seen] == ["/big"], 0.3, "nothing forwarded after /big")
    await holds(lambda: completed == ["/big"], 0.3, "only /big completed upstream")


@pytest.mark.parametrize(
    "response",
    [
        b"garbage garbage\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw",
    ],
)
async def test_malformed_upstream_response_is_502(
    response: bytes, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.response()
    rest = await client.at_eof() if resp.get("connection") == [b"close"] else b""
    client.close()
    assert resp.status == 502
    assert resp.body == b"502 Bad Gateway\n"
    for leaked in (b"garbage", b"hello", b"Bad Header", b"raw", b"websocket"):
        assert leaked not in resp.raw + rest


async def test_stale_pooled_connection_is_retried(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    """An idle pooled connection the upstream closed in the meantime must not cost the client a 502."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        reset(writer)  # e.g. the upstream's own keep-alive timeout raced with our request

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    assert (await client.request(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    resp = await client.request(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.body == b"ok"
    assert up.accepted == 2


async def test_partial_pipelined_head_gets_408(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    """A head that starts arriving while the previous request is served is still bounded by
    client_header (not by the much longer idle timeout)."""
    stable = await upstream_factory("stable")
    extra = "timeouts: {client_header: 1s, idle: 30s}\n"
    app = await proxy_factory(config_text(stable.url, stable.url, extra=extra))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nX-Slow: ")
    first = await client.response()
    assert first.status == 200
    t0 = time.monotonic()
    second = await client.response(timeout=5)
    assert second.status == 408
    assert time.monotonic() - t0 < 3
    assert await client.at_eof() == b""
    client.close()
    assert [s["path"] for s in stable.seen] == ["/1"]


async def test_slow_reading_client_is_not_an_upstream_timeout(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    """While the client leg is blocked the upstream is paused on purpose: that pause must not count
    against the upstream's response timeout."""
    size = 32 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * (1 << 20)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {response: 1s}\n"))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port_of(app)))
    await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.sleep(2.0)  # scenario: a client that reads nothing for twice the response timeout
    received = bytearray()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
        if not data:
            break
        received += data
        if len(received) >= size and b"\r\n\r\n" in received:
            head_len = received.index(b"\r\n\r\n") + 4
            if len(received) - head_len == size:
                break
    sock.close()
    head_len = received.index(b"\r\n\r\n") + 4
    assert len(received) - head_len == size
