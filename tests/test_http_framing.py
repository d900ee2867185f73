"""Message framing through the proxy: Content-Length and chunked bodies both ways, bodiless responses,
Expect: 100-continue, close-delimited upstream bodies, pipelining."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from conftest import RawClient, RawMessage, RawUpstream, Upstream, config_text, read_request, read_response
from support.polling import holds, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


async def digest_handler(request: web.Request) -> web.StreamResponse:
    """Reads the body as it streams in; answers its length and sha256."""
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    return web.Response(text=f"{n} {h.hexdigest()} {request.headers.get('Transfer-Encoding', '-')}")


async def scripted_upstream(raw_upstream: RawFactory, responses: list[bytes]) -> tuple[RawUpstream, list[RawMessage]]:
    """Answers the n-th request (over any connection) with responses[n]; records requests."""
    seen: list[RawMessage] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            seen.append(req)
            writer.write(responses[len(seen) - 1])
            await writer.drain()

    return await raw_upstream(handler), seen


async def test_content_length_upload(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable", handler=digest_handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    body = bytes(range(256)) * 4096  # 1 MiB
    resp = await client.request(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    client.close()
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()} -".encode()


async def test_chunked_upload_is_reframed(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    up, seen = await scripted_upstream(raw_upstream, [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"] * 2)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(
        b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    assert resp.status == 200
    # An empty chunked body is still a valid, complete request upstream.
    resp = await client.request(b"POST /e HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert resp.status == 200
    client.close()
    first, empty = seen
    assert first.get("transfer-encoding") == [b"chunked"]
    assert first.get("content-length") == []
    assert first.body == b"hello 0123456789"
    # Trailers are relayed (both legs chunked: issue 15), chunk extensions are not.
    assert first.raw.endswith(b"0\r\nX-Trailer: t\r\n\r\n") and b"ext=1" not in first.raw
    assert empty.body == b"" and empty.raw.endswith(b"\r\n\r\n0\r\n\r\n")


async def test_chunked_upload_to_aiohttp(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable", handler=digest_handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    parts = [bytes([i]) * (i * 1000 + 1) for i in range(50)]
    await client.send(b"PUT /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in parts:  # separate writes: the proxy forwards as it reads
        await client.send(b"%x\r\n%s\r\n" % (len(part), part))
    await client.send(b"0\r\n\r\n")
    resp = await client.response()
    client.close()
    body = b"".join(parts)
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()} chunked".encode()


async def test_content_length_and_chunked_downloads(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Sum: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    up, _ = await scripted_upstream(raw_upstream, responses)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    got = [await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") for _ in responses]
    client.close()
    assert got[0].get("content-length") == [b"11"] and got[0].body == b"hello world"
    assert got[0].get("transfer-encoding") == []
    assert got[1].get("transfer-encoding") == [b"chunked"] and got[1].get("content-length") == []
    assert got[1].body == b"abcdefg"
    assert got[1].raw.endswith(b"\r\n0\r\nX-Sum: 1\r\n\r\n")  # trailers relayed (both legs chunked)
    assert got[2].get("content-length") == [b"0"] and got[2].body == b""
    assert got[3].get("transfer-encoding") == [b"chunked"] and got[3].raw.endswith(b"\r\n\r\n0\r\n\r\n")


async def test_close_delimited_upstream_body(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(5):
            writer.write(b"part%d;" % i)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    # HTTP/1.1 client: re-framed as chunked, and the client connection stays usable.
    resp = await client.request(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert resp.get("transfer-encoding") == [b"chunked"]
    assert resp.body == b"part0;part1;part2;part3;part4;"
    resp = await client.request(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert resp.body == b"part0;part1;part2;part3;part4;"
    client.close()
    # HTTP/1.0 client: close-delimited as well.
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET /3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert resp.get("transfer-encoding") == [] and resp.get("connection") == [b"close"]
    assert resp.body == b"part0;part1;part2;part3;part4;"
    client.close()
    assert up.accepted == 3


async def test_http10_client_gets_chunked_upstream_body_close_delimited(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    up, _ = await scripted_upstream(
        raw_upstream, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
    )
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")
    raw = await client.at_eof()
    client.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"hello"


@pytest.mark.parametrize(
    ("method", "response"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 1000\r\n\r\n'),
    ],
)
async def test_bodiless_responses(
    method: bytes, response: bytes, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    up, seen = await scripted_upstream(raw_upstream, [response, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"])
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert app.plane is not None and b"Via: 1.1 %s\r\n" % app.plane.via in head
    if method == b"HEAD" and b"Content-Length" in response:
        assert b"Content-Length: 1000" in head  # a HEAD response keeps the length it announces
    # A HEAD response keeps the Transfer-Encoding a GET would get (RFC 9110 9.3.2), never a body.
    assert (b"Transfer-Encoding: chunked" in head) == (method == b"HEAD" and b"chunked" in response)
    # Nothing follows the head: the very next bytes are the next response.
    resp = await client.request(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.body == b"next"
    assert len(seen) == 2 and up.accepted == 1  # the upstream connection was reused too


async def test_expect_100_continue(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable", handler=digest_handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    body = b"x" * 100_000
    await client.send(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    interim = await client.response()  # we send nothing more until the 100 arrives
    assert interim.start == b"HTTP/1.1 100 Continue"
    await client.send(body)
    resp = await client.response()
    assert resp.status == 200
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()} -".encode()
    # The connection is still good for another request.
    resp = await client.request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nz")
    client.close()
    assert resp.body.startswith(b"1 ")


async def test_expect_100_continue_refused_by_upstream(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        bodies.append(await reader.read())

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
    resp = await client.response()
    assert resp.status == 401 and resp.body == b"nope"
    # The body was never sent, so the connection cannot be reused: the proxy says so and closes.
    assert resp.get("connection") == [b"close"]
    assert await client.at_eof() == b""
    client.close()


async def test_pipelined_requests_answered_in_order(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        i = int(request.match_info["tail"])
        body = await request.read()
        await asyncio.sleep((10 - i) * 0.02)  # earlier requests take longer
        return web.Response(text=f"r{i} {body.decode()}")

    up = await upstream_factory("stable", handler=slow)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    data = b"".join(
        b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i
        if i % 2
        else b"POST /%d HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nb%d" % (i, i)
        for i in range(10)
    )
    await client.send(data)  # one write
    bodies = [(await client.response()).body for _ in range(10)]
    client.close()
    assert bodies == [f"r{i} b{i}".encode() if i % 2 == 0 else f"r{i} ".encode() for i in range(10)]


async def test_pipelined_requests_with_chunked_bodies_and_head(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",  # HEAD
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nthird\r\n0\r\n\r\n",
    ]
    up, seen = await scripted_upstream(raw_upstream, responses)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(
        b"POST /1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n0\r\n\r\n"
        b"HEAD /2 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n"
    )
    first = await client.response()
    second = await client.response(b"HEAD")
    third = await client.response()
    client.close()
    assert (first.body, second.get("content-length"), third.body) == (b"first", [b"500"], b"third")
    assert [m.body for m in seen] == [b"one", b"", b"three"]


async def test_interim_responses_pass_through(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    up, _ = await scripted_upstream(
        raw_upstream,
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ],
    )
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    hints = await client.response()
    final = await client.response()
    client.close()
    assert hints.status == 103 and hints.get("link") == [b"</s.css>; rel=preload"]
    assert final.status == 200 and final.body == b"ok"


async def test_large_chunked_download_streams(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(app))
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert resp.body == piece * 64


async def test_head_response_with_connection_close_is_not_pooled(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        if req.start.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.5)  # the close comes late: the proxy must not reuse the connection
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    head = await client.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", method=b"HEAD")
    assert head.status == 200 and head.get("content-length") == [b"10"]
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.body == b"ok"
    assert up.accepted == 2


async def test_backpressure_holds_for_the_next_pipelined_response(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    """A response that completes while the client is not reading leaves the client leg paused; the
    next pipelined request's upstream must start paused too instead of streaming into memory."""
    big = 16 * 1024 * 1024
    block = b"b" * (1 << 20)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            if req.start.startswith(b"GET /small"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 102400\r\n\r\n" + b"s" * 102400)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
                for _ in range(big // len(block)):
                    writer.write(block)
                    await writer.drain()
            await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    assert app.plane is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing for now
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port_of(app)))
    # The proxy accepts in its own time: wait for the connection object, never a fixed sleep.
    (conn,) = await wait_until(lambda: list(app.plane.clients), what="the proxy to accept the connection")
    assert conn.transport is not None
    # A slow network path: little room in the kernel, so the proxy's own buffer fills at once.
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await loop.sock_sendall(sock, b"GET /small HTTP/1.1\r\nHost: h\r\n\r\nGET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    # Backpressure engaged (the transport asked us to stop writing), then it stays bounded.
    await wait_until(lambda: conn.write_blocked_at, what="the client write buffer to fill up")
    limit = 4 * 1024 * 1024
    await holds(lambda: conn.transport is not None and conn.transport.get_write_buffer_size() < limit, 0.5,
                what=f"fewer than {limit} bytes buffered for a client that reads nothing")
    total = 0
    expected = 102400 + big + 2 * len(b"HTTP/1.1 200 OK\r\n")  # at least
    while total < expected:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
        assert data
        total += len(data)
    sock.close()
