"""Slow and vanishing clients, over real sockets: slowloris heads are cut by `client_header`, slow
bodies by `client_body` (per read), slow readers by `send`; a client that disconnects mid-request or
mid-response closes its upstream connection within a second. Waits poll with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

from conftest import LoggingUpstream, RawClient, RawUpstream, config_text, read_head, read_request, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]
RawFactory = Callable[..., Awaitable[RawUpstream]]

SLOW = 500


async def test_500_slowloris_connections_are_cut_while_a_normal_request_succeeds(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {client_header: 1s}\n"))
    assert app.plane is not None
    plane = app.plane
    port = plane.bound_port
    t0 = time.monotonic()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(SLOW)]
    for _, w in conns:
        w.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
    results: list[bytes] = [b""] * SLOW
    closed_at: list[float] = [0.0] * SLOW

    async def watch(i: int, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionResetError):
            results[i] = await reader.read()
        closed_at[i] = time.monotonic()

    watchers = [asyncio.create_task(watch(i, r)) for i, (r, _) in enumerate(conns)]
    stop = asyncio.Event()

    async def trickle() -> None:  # one header byte per connection every 200 ms, for up to 20 s
        for _ in range(100):
            for _, w in conns:
                if not w.is_closing():
                    w.write(b"X")
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
                return
            except TimeoutError:
                pass

    trickler = asyncio.create_task(trickle())
    await wait_until(lambda: len(plane.clients) >= SLOW, what="all slow connections accepted")
    # A normal client is served at once while every slow connection is still open.
    normal = await RawClient.connect(port)
    resp = await normal.request(b"GET /normal HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(plane.clients) >= SLOW + 1
    normal.close()
    assert resp.status == 200
    await asyncio.wait_for(asyncio.gather(*watchers), 10)  # they would trickle for 20 s otherwise
    stop.set()
    await trickler
    for _, w in conns:
        w.close()
    assert all(r.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for r in results), {r[:40] for r in results}
    assert min(closed_at) - t0 >= 0.9  # not before the deadline
    await wait_until(lambda: not plane.clients, what="every client connection released")
    assert up.urls() == [b"/normal"]


async def test_slow_body_hits_the_per_read_body_timeout(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {client_body: 1s}\n"))
    assert app.plane is not None
    # Trickling a byte every 300 ms keeps the upload alive: the timeout is per read, not per body.
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(b"POST /trickle HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n")
    for b in b"trickled":
        await asyncio.sleep(0.3)
        await client.send(bytes([b]))
    resp = await client.response()
    assert resp.status == 200
    # A body that stalls gets a 408 and the half-sent request is dropped upstream.
    await client.send(b"POST /stall HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npartial")
    stalled = await client.response(timeout=5)
    assert stalled.status == 408 and stalled.get("connection") == [b"close"]
    assert await client.at_eof() == b""
    client.close()
    assert up.urls() == [b"/trickle"]
    assert up.requests[0].body == b"trickled"
    await wait_until(lambda: up.open == 0, what="the stalled request's upstream connection closed")


async def test_slow_reader_is_cut_by_the_send_timeout(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    upstream_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        block = b"z" * (1 << 20)
        try:
            for _ in range(1024):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            upstream_closed.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="timeouts: {send: 1s, response: 30s}\n"))
    assert app.plane is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", app.plane.bound_port))
    await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: any(c.write_blocked_at for c in app.plane.clients) if app.plane else False)
    t0 = time.monotonic()
    # Never read: the proxy's writes block; after `send` it gives up on us and on the upstream.
    await wait_until(lambda: not app.plane.clients if app.plane else False, timeout=10, what="slow reader cut")
    waited = time.monotonic() - t0
    await asyncio.wait_for(upstream_closed.wait(), 5)
    received = 0
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
            received += len(chunk)
    except ConnectionResetError:
        pass
    sock.close()
    assert waited >= 0.9
    assert received < 1 << 30  # truncated, never presented as complete


async def test_client_gone_mid_upload_closes_upstream_within_a_second(
    logging_upstream: LogFactory, proxy_factory: ProxyFactory
) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(app.plane.bound_port if app.plane else 0)
    await client.send(b"PUT /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"u" * 5000)
    await wait_until(lambda: up.open == 1 and len(up.raw) > 5000, what="upload under way upstream")
    client.close()
    t0 = time.monotonic()
    await wait_until(lambda: up.open == 0, timeout=1.0, what="upstream connection closed")
    assert up.closed_at[-1] - t0 < 1.0
    assert up.requests == []  # never completed upstream


async def test_client_gone_while_queued_and_connecting(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    """Pipelined requests queued behind a slow one, then the client vanishes: every upstream
    connection opened for it is closed within a second, and nothing is left in the data plane."""
    accepted: list[asyncio.StreamWriter] = []
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")  # then stall
        await writer.drain()
        await reader.read()
        gone.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n" + b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n" * 3)
    await read_head(client.reader)
    client.close()
    t0 = time.monotonic()
    await asyncio.wait_for(gone.wait(), 1.0)
    assert time.monotonic() - t0 < 1.0
    await wait_until(lambda: app.plane is not None and not app.plane.clients and not app.plane.upstream_conns)
    assert app.plane.stats.in_flight == 0
