"""HTTP/1.1 clients through the proxy to HTTP/2 upstreams (`protocol: h2`, cleartext prior knowledge):
trailers relayed as chunked trailers, multiplexing and pooling, GOAWAY, an upstream dying, flow
control towards a slow client, gRPC status mapping and accounting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import RawClient, config_text, free_port, wait_until
from support.h2server import H2Server, Stream

from proxy.control.app import ProxyApp

GRPC_HEAD = (
    b"POST /echo.Echo/Say HTTP/1.1\r\nHost: svc\r\nContent-Type: application/grpc\r\nTE: trailers\r\n"
)
MESSAGE = b"\x00\x00\x00\x00\x05hello"


def grpc_request(extra: bytes = b"", body: bytes = MESSAGE) -> bytes:
    return GRPC_HEAD + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def h2_config(stable: str, canary: str, extra: str = "", routes: str | None = None) -> str:
    text = config_text(stable, canary, extra, routes)
    for v in ("v1", "v2"):
        text = text.replace(f"version: {v}}}", f"version: {v}, protocol: h2}}")
    return text


@pytest.fixture
async def h2_servers() -> AsyncIterator[Callable[..., Awaitable[H2Server]]]:
    started: list[H2Server] = []

    async def start(handler: Callable[[Stream], Awaitable[None]], max_streams: int = 100) -> H2Server:
        server = await H2Server(handler, max_streams).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def ok_grpc(stream: Stream) -> None:
    await stream.respond(
        200,
        [(b"content-type", b"application/grpc")],
        b"\x00\x00\x00\x00\x02hi",
        [(b"grpc-status", b"0"), (b"grpc-message", b"fine")],
    )


async def read_chunked(client: RawClient) -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
    """(headers, raw body incl. chunk framing, trailer block) of one chunked response."""
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    lines = head[:-4].split(b"\r\n")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]
    assert lines[0].startswith(b"HTTP/1.1 200"), head
    assert (b"transfer-encoding", b"chunked") in headers, head
    raw = b""
    while True:
        size_line = await asyncio.wait_for(client.reader.readuntil(b"\r\n"), 5)
        size = int(size_line, 16)
        if size == 0:
            break
        raw += await client.reader.readexactly(size + 2)
    trailers = b""
    while (line := await asyncio.wait_for(client.reader.readuntil(b"\r\n"), 5)) != b"\r\n":
        trailers += line
    return headers, raw, trailers


async def test_trailers_are_relayed_as_chunked_trailers(proxy_factory, h2_servers, raw_client) -> None:
    server = await h2_servers(ok_grpc)
    app: ProxyApp = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(grpc_request())
    headers, body, trailers = await read_chunked(client)
    assert (b"content-type", b"application/grpc") in headers
    assert b"\x00\x00\x00\x00\x02hi" in body
    assert b"grpc-status: 0\r\n" in trailers and b"grpc-message: fine\r\n" in trailers, trailers
    # What the upstream saw: HTTP/2 pseudo-headers from the HTTP/1.1 request, te: trailers, the body.
    seen = server.requests[0]
    assert seen.header(b":method") == b"POST" and seen.header(b":path") == b"/echo.Echo/Say"
    assert seen.header(b":authority") == b"svc" and seen.header(b"host") is None
    assert seen.header(b"te") == b"trailers" and seen.header(b"x-forwarded-for") == b"127.0.0.1"
    assert seen.body == MESSAGE
    # The client connection stays usable, and the upstream connection is reused.
    await client.send(grpc_request())
    await read_chunked(client)
    assert server.accepts == 1


async def test_concurrent_requests_share_one_upstream_connection(proxy_factory, h2_servers, raw_client) -> None:
    n = 20
    arrived = asyncio.Event()

    async def slow(stream: Stream) -> None:
        if len(server.requests) >= n:
            arrived.set()
        await asyncio.wait_for(arrived.wait(), 5)  # every request is in flight at once
        await ok_grpc(stream)

    server = await h2_servers(slow)
    app = await proxy_factory(h2_config(server.url, server.url))
    clients = [await raw_client(app.plane.bound_port) for _ in range(n)]
    for c in clients:
        await c.send(grpc_request())
    results = await asyncio.gather(*(read_chunked(c) for c in clients))
    assert all(b"grpc-status: 0" in t for _, _, t in results)
    assert len(server.requests) == n
    assert server.accepts < n and server.accepts == 1, server.accepts


async def test_max_concurrent_streams_opens_another_connection(proxy_factory, h2_servers, raw_client) -> None:
    n = 6
    arrived = asyncio.Event()

    async def slow(stream: Stream) -> None:
        if len(server.requests) >= n:
            arrived.set()
        await asyncio.wait_for(arrived.wait(), 5)
        await ok_grpc(stream)

    server = await h2_servers(slow, max_streams=2)
    app = await proxy_factory(h2_config(server.url, server.url))
    clients = [await raw_client(app.plane.bound_port) for _ in range(n)]
    # The first request lets the proxy learn the server's SETTINGS (2 streams per connection).
    for c in clients:
        await c.send(grpc_request())
    results = await asyncio.gather(*(read_chunked(c) for c in clients))
    assert all(b"grpc-status: 0" in t for _, _, t in results)
    assert 3 <= server.accepts < n, server.accepts


async def test_goaway_sends_unprocessed_streams_to_a_new_connection(proxy_factory, h2_servers, raw_client) -> None:
    hold = asyncio.Event()

    async def handler(stream: Stream) -> None:
        if stream.conn is server.conns[0] and stream.sid == 1:
            await asyncio.wait_for(hold.wait(), 5)
            await ok_grpc(stream)
        elif stream.conn is server.conns[0]:
            stream.goaway(1)  # stream 1 will be answered; this one (id 3) was not processed
            hold.set()
        else:
            await ok_grpc(stream)

    server = await h2_servers(handler)
    app = await proxy_factory(h2_config(server.url, server.url))
    first, second = await raw_client(app.plane.bound_port), await raw_client(app.plane.bound_port)
    await first.send(grpc_request())
    await wait_until(lambda: len(server.requests) == 1, what="first stream at the upstream")
    await second.send(grpc_request())
    (_, _, t1), (_, _, t2) = await asyncio.gather(read_chunked(first), read_chunked(second))
    assert b"grpc-status: 0" in t1 and b"grpc-status: 0" in t2
    assert server.accepts == 2
    # Not an error of the upstream: the refused stream was never processed.
    assert sum(app.stats.upstreams["stable"].errors) == 0


async def test_upstream_dying_before_the_response_is_a_502(proxy_factory, h2_servers, raw_client) -> None:
    async def die(stream: Stream) -> None:
        stream.die()

    server = await h2_servers(die)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    resp = await client.request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert resp.status == 502
    assert app.stats.upstreams["stable"].errors[2] >= 1  # reset


async def test_upstream_dying_mid_stream_truncates(proxy_factory, h2_servers, raw_client) -> None:
    async def die_midway(stream: Stream) -> None:
        stream.send_headers(200, [(b"content-type", b"text/plain")])
        await stream.send_data(b"partial")
        await asyncio.sleep(0.05)
        stream.die()

    server = await h2_servers(die_midway)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
    rest = await client.at_eof()
    assert rest.startswith(b"HTTP/1.1 200") and b"partial" in rest
    assert not rest.endswith(b"0\r\n\r\n"), "a truncated response must not look complete"


async def test_large_body_both_ways_with_flow_control(proxy_factory, h2_servers, raw_client) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many times the default 64 KiB stream window

    async def echo(stream: Stream) -> None:
        await stream.respond(200, [(b"content-length", b"%d" % len(stream.body))], stream.body)

    server = await h2_servers(echo)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    resp = await client.request(
        b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(big) + big, timeout=20
    )
    assert resp.status == 200 and resp.body == big
    assert server.requests[0].body == big


async def test_trailers_only_grpc_error_counts_for_the_analysis(proxy_factory, h2_servers, raw_client) -> None:
    async def unavailable(stream: Stream) -> None:
        stream.send_headers(
            200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", b"down")], end=True
        )

    server = await h2_servers(unavailable)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(grpc_request())
    headers, body, _ = await read_chunked(client)
    assert (b"grpc-status", b"14") in headers and (b"grpc-message", b"down") in headers and body == b""
    us = app.stats.upstreams["stable"]
    await wait_until(lambda: app.stats.grpc.get("stable", [0] * 17)[14] == 1, what="grpc counted")
    stats = us.window.stats(time.time(), 60)
    assert stats.requests == 1 and stats.errors == 1


async def test_grpc_timeout_gives_deadline_exceeded(proxy_factory, h2_servers, raw_client) -> None:
    async def never(stream: Stream) -> None:
        await asyncio.sleep(30)

    server = await h2_servers(never)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    t0 = time.monotonic()
    resp = await client.request(grpc_request(b"grpc-timeout: 300m\r\n"), timeout=5)
    took = time.monotonic() - t0
    assert resp.status == 200 and resp.one("grpc-status") == b"4", resp.raw
    assert resp.one("content-type") == b"application/grpc"
    assert 0.25 <= took < 2.0, took
    await wait_until(lambda: server.resets, what="the upstream stream is reset")


async def test_own_errors_for_grpc_requests_carry_grpc_status(proxy_factory, raw_client) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    routes = "  - name: svc\n    match: {path_prefix: /echo.Echo/}\n    to: stable\n"
    app = await proxy_factory(h2_config(dead, dead, routes=routes))
    client = await raw_client(app.plane.bound_port)
    resp = await client.request(grpc_request())
    assert resp.status == 200 and resp.one("grpc-status") == b"14", resp.raw  # unreachable: UNAVAILABLE
    other = await raw_client(app.plane.bound_port)
    resp = await other.request(grpc_request().replace(b"/echo.Echo/Say", b"/other.Svc/Do"))
    assert resp.status == 200 and resp.one("grpc-status") == b"12", resp.raw  # no route: UNIMPLEMENTED
    plain = await raw_client(app.plane.bound_port)
    resp = await plain.request(b"GET /nothing HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert resp.status == 404  # not gRPC: the HTTP answer as before


async def test_a_slow_client_stops_the_upstream_through_its_window(proxy_factory, h2_servers, raw_client) -> None:
    size = 32 << 20
    chunk = b"x" * 65536
    sent = [0]

    async def big(stream: Stream) -> None:
        stream.send_headers(200, [(b"content-length", b"%d" % size)])
        while sent[0] < size:
            await stream.send_data(chunk)
            sent[0] += len(chunk)
        stream.conn.h2.end_stream(stream.sid)
        stream.conn.flush()

    server = await h2_servers(big)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
    # Nothing is read: the server must stall once socket buffers and its window are full.
    await wait_until(lambda: sent[0] > 0, what="the download starts")
    await progress_stops(sent)
    assert sent[0] < size // 2, f"{sent[0]} of {size} bytes sent to a client that reads nothing"
    resp = await client.response(timeout=60)
    assert resp.status == 200 and len(resp.body) == size
    assert sent[0] == size


async def progress_stops(sent: list[int]) -> None:
    """Wait until `sent[0]` has not moved for 0.5 s (at most 10 s): a measurement, not a sync."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = sent[0]
        await asyncio.sleep(0.5)
        if sent[0] == before:
            return
    raise AssertionError("the upstream never stopped sending")


async def test_expect_100_continue_is_relayed(proxy_factory, h2_servers, raw_client) -> None:
    async def echo(stream: Stream) -> None:
        await stream.respond(200, [(b"content-length", b"%d" % len(stream.body))], stream.body)

    server = await h2_servers(echo)
    app = await proxy_factory(h2_config(server.url, server.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = await client.response()
    assert interim.status == 100  # from the upstream, before any byte of the body was sent
    assert server.requests[0].body == b""
    final = await client.request(b"hello")
    assert final.status == 200 and final.body == b"hello"


async def test_reload_away_from_an_h2_endpoint_lets_its_streams_finish(
    proxy_factory, h2_servers, raw_client
) -> None:
    release = asyncio.Event()

    async def held(stream: Stream) -> None:
        await asyncio.wait_for(release.wait(), 10)
        await ok_grpc(stream)

    old, new = await h2_servers(held), await h2_servers(ok_grpc)
    app = await proxy_factory(h2_config(old.url, old.url))
    client = await raw_client(app.plane.bound_port)
    await client.send(grpc_request())
    await wait_until(lambda: len(old.requests) == 1, what="the request at the old endpoint")
    path = app.config.source_path
    with open(path, "w") as f:
        f.write(h2_config(new.url, new.url))
    assert (await app.reload("test"))[0]
    # New requests go to the new endpoint; the one in flight on the retired pool still completes.
    other = await raw_client(app.plane.bound_port)
    await other.send(grpc_request())
    _, _, trailers = await read_chunked(other)
    assert b"grpc-status: 0" in trailers and len(new.requests) == 1
    release.set()
    _, body, trailers = await read_chunked(client)
    assert b"grpc-status: 0" in trailers and b"hi" in body
    await wait_until(lambda: all(c.transport is None for c in old.conns), what="the old connection closed")
