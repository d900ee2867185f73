"""Configurable limits, at their exact boundaries, over real sockets: header size and count (431),
URL length (414), body size per route (413), client connections (503). One byte over the limit is
refused and never forwarded; the limit itself is accepted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from conftest import LoggingUpstream, RawClient, config_text, wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
LogFactory = Callable[[], Awaitable[LoggingUpstream]]

LIMITS = "limits: {max_header_size: 1KiB, max_headers: 10, max_url_length: 256, max_body_size: 100}\n"
ROUTES = (
    "  - name: small\n    match: {path_prefix: /small}\n    to: stable\n    max_body_size: 10\n"
    "  - name: big\n    match: {path_prefix: /big}\n    to: stable\n    max_body_size: 1000\n"
    "  - name: default\n    to: stable\n"
)


async def answer(app: ProxyApp, data: bytes) -> tuple[int, bool]:
    """(status, connection closed after it) for one request on a fresh connection."""
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    try:
        resp = await client.request(data)
        closed = resp.get("connection") == [b"close"]
        if closed:
            assert await client.at_eof() == b""
        return resp.status, closed
    finally:
        client.close()


def head_with(pad: int, headers: int = 0) -> bytes:
    """Host (9 counted bytes) + X-Pad (9 + pad) + `headers` more 8-byte headers (`X-n: v` + 4)."""
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(headers))
    return b"GET /h HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * pad + b"\r\n" + extra + b"\r\n"


@pytest.fixture
async def limited(logging_upstream: LogFactory, proxy_factory: ProxyFactory) -> tuple[ProxyApp, LoggingUpstream]:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra=LIMITS, routes=ROUTES))
    return app, up


async def test_header_size_boundary(limited: tuple[ProxyApp, LoggingUpstream]) -> None:
    app, up = limited
    # Each header counts name + value + 4 (": " and CRLF): 9 + (9 + pad) <= 1024.
    assert await answer(app, head_with(1024 - 18)) == (200, False)
    assert await answer(app, head_with(1024 - 17)) == (431, True)
    assert up.urls() == [b"/h"]


async def test_header_count_boundary(limited: tuple[ProxyApp, LoggingUpstream]) -> None:
    app, up = limited
    assert await answer(app, head_with(1, headers=8)) == (200, False)  # Host + X-Pad + 8 = 10
    assert await answer(app, head_with(1, headers=9)) == (431, True)
    assert up.urls() == [b"/h"]


async def test_url_length_boundary(limited: tuple[ProxyApp, LoggingUpstream]) -> None:
    app, up = limited
    ok = b"/" + b"u" * 255
    assert await answer(app, b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % ok) == (200, False)
    assert await answer(app, b"GET %su HTTP/1.1\r\nHost: h\r\n\r\n" % ok) == (414, True)
    assert up.urls() == [ok]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("path", "limit"), [(b"/small", 10), (b"/big", 1000), (b"/other", 100)])
async def test_body_size_per_route_boundary(
    path: bytes, limit: int, chunked: bool, limited: tuple[ProxyApp, LoggingUpstream]
) -> None:
    """A route's max_body_size overrides the global one, smaller or larger."""
    app, up = limited

    def post(size: int) -> bytes:
        body = b"b" * size
        if chunked:
            return b"POST %s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                path,
                size,
                body,
            )
        return b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (path, size, body)

    assert await answer(app, post(limit)) == (200, False)
    assert await answer(app, post(limit + 1)) == (413, True)
    assert up.urls() == [path]  # one read holds the whole request: nothing of it went upstream
    assert up.partial == 0


async def test_max_connections_503_then_recovers(logging_upstream: LogFactory, proxy_factory: ProxyFactory) -> None:
    up = await logging_upstream()
    app = await proxy_factory(config_text(up.url, up.url, extra="limits: {max_connections: 5}\n"))
    assert app.plane is not None
    port = app.plane.bound_port
    held = [await RawClient.connect(port) for _ in range(5)]
    for c in held:  # each one is accepted and served (and so counted)
        assert (await c.request(b"GET /held HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    over = await RawClient.connect(port)
    got = await over.at_eof()
    over.close()
    assert got.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Connection: close" in got
    held.pop().close()
    await wait_until(lambda: app.plane is not None and len(app.plane.clients) == 4, what="a slot freed")
    again = await RawClient.connect(port)
    assert (await again.request(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    again.close()
    for c in held:
        c.close()
    assert up.urls().count(b"/again") == 1


async def test_endless_header_is_cut_off_at_the_limit(limited: tuple[ProxyApp, LoggingUpstream]) -> None:
    """A header value that never ends must not be buffered without bound (the parser only reports a
    header once it is complete): the head is refused once it outgrows the limits."""
    app, up = limited
    assert app.plane is not None
    client = await RawClient.connect(app.plane.bound_port)
    await client.send(b"GET /h HTTP/1.1\r\nHost: h\r\nX-Endless: ")
    sent = 0
    block = b"a" * 16384
    try:
        while sent < 64 * 1024 * 1024:
            client.writer.write(block)
            await asyncio.wait_for(client.writer.drain(), 5)
            sent += len(block)
            if client.reader.at_eof() or len(client.reader._buffer):  # answered early
                break
            await asyncio.sleep(0)
    except (ConnectionResetError, BrokenPipeError):
        pass
    data = await client.at_eof()
    client.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    assert sent < 4 * 1024 * 1024  # cut off long before the 64 MiB the client was ready to send
    assert up.requests == []
