"""Malformed HTTP/2 header lists against a real `canary-proxy run` process (RFC 9113 8.2, 8.3): each
gets GOAWAY PROTOCOL_ERROR (a connection error) and no response, and the next client is served.
The leg checks these itself (the protocol library's own inbound validation is switched off)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from conftest import ProxyProcess, Upstream, config_text, wait_running
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame
from support.h2raw import PROTOCOL_ERROR, RawH2

StartUpstream = Callable[..., Awaitable[Upstream]]
StartProcess = Callable[..., ProxyProcess]
Fields = list[tuple[bytes, bytes]]

OK: Fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"h2.test")]

MALFORMED: dict[str, Fields] = {
    "upper-case name": [*OK, (b"X-Upper", b"1")],
    "space in a name": [*OK, (b"x bad", b"1")],
    "colon in a name": [*OK, (b"x:bad", b"1")],
    "empty name": [*OK, (b"", b"1")],
    "connection": [*OK, (b"connection", b"close")],
    "keep-alive": [*OK, (b"keep-alive", b"5")],
    "proxy-connection": [*OK, (b"proxy-connection", b"x")],
    "transfer-encoding": [*OK, (b"transfer-encoding", b"chunked")],
    "upgrade": [*OK, (b"upgrade", b"websocket")],
    "te other than trailers": [*OK, (b"te", b"gzip")],
    "pseudo after regular": [*OK[:3], (b"accept", b"*/*"), OK[3]],
    "duplicate :path": [*OK, (b":path", b"/y")],
    "unknown pseudo": [*OK, (b":foo", b"1")],
    ":status in a request": [*OK, (b":status", b"200")],
    "no :method": OK[1:],
    "no :scheme": [OK[0], *OK[2:]],
    "no :path": [*OK[:2], OK[3]],
    "empty :path": [*OK[:2], (b":path", b""), OK[3]],
    "no :authority nor host": OK[:3],
    ":authority and host differ": [*OK, (b"host", b"other.test")],
    "host twice": [*OK[:3], (b"host", b"h2.test"), (b"host", b"h2.test")],
    "LF in a value": [*OK, (b"x-a", b"a\nb")],
    "CR in a value": [*OK, (b"x-a", b"a\rb")],
    "NUL in a value": [*OK, (b"x-a", b"a\x00b")],
    "space around a value": [*OK, (b"x-a", b" a")],
    ":protocol without CONNECT": [*OK, (b":protocol", b"websocket")],
}


@pytest.fixture
async def proxy(proxy_process: StartProcess, upstream_factory: StartUpstream) -> ProxyProcess:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {request.path} {request.headers.get('te', '-')}\n")

    up = await upstream_factory("stable", handle)
    pp = proxy_process(config_text(up.url, up.url))
    wait_running(pp)
    return pp


async def send(port: int, fields: Fields, trailers: Fields | None = None) -> RawH2:
    """Open a connection, send one request as hand-made frames (no client-side checks)."""
    client = await RawH2.open(port)
    enc = Encoder()
    if trailers is None:
        client.raw(HeadersFrame(1, data=enc.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize())
    else:
        client.raw(HeadersFrame(1, data=enc.encode(fields), flags=["END_HEADERS"]).serialize())
        client.raw(DataFrame(1, data=b"body").serialize())
        client.raw(HeadersFrame(1, data=enc.encode(trailers), flags=["END_HEADERS", "END_STREAM"]).serialize())
    return client


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_request_gets_goaway_protocol_error(proxy: ProxyProcess, case: str) -> None:
    client = await send(proxy.port, MALFORMED[case])
    await client.closes()
    client.close()
    assert client.goaway_code() == PROTOCOL_ERROR, (case, client.frames[-3:])
    assert not any(ftype == 0x1 for ftype, *_ in client.frames), "no response to a malformed request"


@pytest.mark.parametrize(
    "trailers", [[(b":path", b"/t")], [(b"Grpc-Status", b"0")], [(b"connection", b"x")], [(b"x-a", b"a\nb")]]
)
async def test_malformed_trailers_get_goaway_protocol_error(proxy: ProxyProcess, trailers: Fields) -> None:
    client = await send(proxy.port, [*OK, (b"content-type", b"text/plain")], trailers)
    await client.closes()
    client.close()
    assert client.goaway_code() == PROTOCOL_ERROR, (trailers, client.frames[-3:])


async def test_allowed_variants_are_served(proxy: ProxyProcess) -> None:
    # te: trailers, a Host equal to :authority, cookie crumbs anywhere, an empty value: all fine.
    fields = [*OK, (b"te", b"trailers"), (b"host", b"h2.test"), (b"cookie", b"a=1"), (b"x-empty", b"")]
    client = await RawH2.open(proxy.port)
    client.conn.send_headers(1, [*fields, (b"cookie", b"b=2")], end_stream=True)
    client.flush()
    await client.pump(lambda c: c.ended(1))
    status, _, body = client.response(1)
    client.close()
    assert status == 200 and body.startswith(b"ok /x"), (status, body)
