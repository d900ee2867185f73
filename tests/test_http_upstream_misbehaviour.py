"""Issue 15: trailers, early answers, bounded upstream heads and interim responses, WebSocket close
frames on a lost upstream, and linear-time regexes in match rules."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import websockets
from conftest import RawClient, RawMessage, RawUpstream, Upstream, config_text, read_request
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.utils import accept_key

from proxy.analysis.stats import KIND_PROTOCOL
from proxy.config import ConfigError, parse_config
from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]
UpFactory = Callable[..., Awaitable[Upstream]]


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


def protocol_errors(app: ProxyApp, upstream: str = "stable") -> int:
    assert app.plane is not None
    return int(app.plane.snapshot.upstreams[upstream].stats.errors[KIND_PROTOCOL])


# -- 7. Trailers and early answers ---------------------------------------------------------------


async def test_trailers_relayed_both_ways(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    seen: list[RawMessage] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(
            b"HTTP/1.1 200 OK\r\nTrailer: grpc-status, grpc-message\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(
        b"POST /rpc HTTP/1.1\r\nHost: h\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nx-checksum: 42\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    client.close()
    assert resp.status == 200 and resp.body == b"abc"
    assert resp.get("trailer") == [b"grpc-status, grpc-message"]
    assert resp.raw.endswith(b"0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n")
    req = seen[0]
    assert req.get("trailer") == [b"x-checksum"]
    assert req.raw.endswith(b"0\r\nx-checksum: 42\r\n\r\n")  # our own fields never come from trailers


async def test_early_answer_keeps_the_client_connection(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):  # answer at once, never read the body
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nConnection: close\r\n\r\nauth")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n" + b"x" * 1000)
    first = await client.response()
    assert first.status == 401 and first.get("connection") == []
    await client.send(b"y" * 199000)  # the rest of the body: read and dropped
    second = await client.request(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert second.status == 200 and second.body == b"ok"


# -- 9. Upstream heads and interim responses are bounded -----------------------------------------


async def test_huge_upstream_headers_are_a_502(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        block = line * 1000  # about 1 MB per write, 100 MB in all unless the proxy stops reading
        for _ in range(100):
            writer.write(block)
            await writer.drain()
            sent += len(block)
        writer.write(b"Content-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", timeout=20)
    client.close()
    assert resp.status == 502 and sent < 10_000_000
    assert protocol_errors(app) == 1  # the upstream's fault


async def test_one_huge_upstream_header_line_is_a_502(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(100):
            writer.write(b"e" * 1_000_000)
            await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", timeout=20)
    client.close()
    assert resp.status == 502 and protocol_errors(app) == 1


async def test_interim_response_flood_is_cut(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        for _ in range(100):
            writer.write(hint * 1000)  # 100,000 interim responses
            await writer.drain()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url, extra="retries: {attempts: 0}\n"))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    hints = 0
    while True:
        resp = await client.response(timeout=20)
        if resp.status != 103:
            break
        hints += 1
    client.close()
    assert resp.status == 502 and 1 <= hints <= 32 and protocol_errors(app) == 1


async def test_a_few_interim_responses_are_relayed(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" * 3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    statuses = [(await client.response()).status for _ in range(4)]
    client.close()
    assert statuses == [103, 103, 103, 200]


# -- 6. WebSocket close frame on a lost upstream -------------------------------------------------


async def test_websocket_close_1009_survives_the_upstream_reset(proxy_factory: ProxyFactory) -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, max_size=1024) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        app = await proxy_factory(config_text(url, url))
        codes = []
        for _ in range(20):
            async with ws_connect(f"ws://127.0.0.1:{port_of(app)}/ws", max_size=None) as ws:
                await ws.send("small")
                assert await ws.recv() == "small"
                try:
                    await ws.send(
                        b"z" * 8 * 1024 * 1024
                    )  # over max_size: still sending at the reset
                    await asyncio.wait_for(ws.recv(), 5)
                except ConnectionClosed as exc:
                    codes.append(exc.rcvd.code if exc.rcvd is not None else None)
        assert codes == [1009] * 20
    assert websockets.__version__


async def test_websocket_close_then_reset_reaches_a_client_still_sending(
    raw_upstream: RawFactory, proxy_process: Any
) -> None:
    """The upstream writes a close frame (1009) and resets the connection at once (SO_LINGER 0)
    while the client is still sending a large frame. The proxy, a separate process, must pass the
    close frame on and close the client side gently: a full close with the client's bytes unread
    resets the client connection, and the client then loses the close frame."""

    async def close_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key.decode()).encode())  # fmt: skip
        await reader.readexactly(64 * 1024)  # the big frame has started
        writer.write(b"\x88\x02\x03\xf1")  # close, 1009 (message too big)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST: the rest of the frame is never read

    up = await raw_upstream(close_then_reset)
    proxy = proxy_process(config_text(up.url, up.url))
    codes = []
    for _ in range(20):
        ws = await ws_connect(f"ws://127.0.0.1:{proxy.port}/ws", max_size=None, close_timeout=2)
        try:
            await asyncio.wait_for(ws.send(b"z" * 32 * 1024 * 1024), 10)  # still sending at the reset
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            codes.append(exc.rcvd.code if exc.rcvd is not None else None)
        await asyncio.wait_for(ws.wait_closed(), 10)  # (no close(): the connection is gone already)
    assert codes == [1009] * 20


# -- 8. Regexes: linear time or refused ----------------------------------------------------------

CATASTROPHIC = ["(a+)+$", "(a|aa)+$", "(a|a?)+$", "(a*)*b", "(.*a){12}", "^(\\w+\\s?)*$", "(x+x+)+y", "([a-z]+)*[0-9]"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
async def test_catastrophic_patterns_match_in_linear_time(
    pattern: str, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    stable, canary = await raw_upstream(ok), await raw_upstream(ok)
    quoted = pattern.replace("\\", "\\\\")
    routes = f'  - name: rx\n    match: {{headers: {{x-user: {{regex: "{quoted}"}}}}}}\n    to: canary\n'
    routes += "  - name: rest\n    to: stable\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    client = await RawClient.connect(port_of(app))
    for value in (b"a" * 10_000 + b"!", b"x" * 10_000 + b"!", b"ab " * 3_400 + b"!"):
        t0 = time.monotonic()
        resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-User: %s\r\n\r\n" % value)
        assert time.monotonic() - t0 < 0.5 and resp.status == 200
    client.close()


@pytest.mark.parametrize("pattern", ["(a)\\\\1", "(?=a)a", "(?<!b)a", "a{1001}", "(?P<x>a)(?P=x)"])
def test_patterns_re2_cannot_run_are_refused_with_their_key_path(pattern: str) -> None:
    text = (
        "listen: 127.0.0.1:0\nupstreams:\n  s: {endpoints: [http://127.0.0.1:1]}\nroutes:\n"
        f'  - name: r\n    match: {{cookies: {{c: {{regex: "{pattern}"}}}}}}\n    to: s\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors[0].startswith("routes[0].match.cookies.c.regex: invalid regex"), info.value.errors


def test_regex_keeps_fullmatch_semantics() -> None:
    from proxy.config.saferegex import compile_fullmatch

    test = compile_fullmatch("beta-[0-9]+")
    assert test(b"beta-12") and not test(b"beta-12x") and not test(b"xbeta-12")
    assert compile_fullmatch("caf\u00e9")("caf\u00e9".encode())  # UTF-8 patterns match UTF-8 bytes
