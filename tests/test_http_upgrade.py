"""Upgrade (WebSocket): after the upstream's 101 the proxy tunnels bytes both ways, unchanged."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from conftest import RawClient, RawMessage, RawUpstream, Upstream, config_text, read_head, read_request
from support.polling import wait_until

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]

UPGRADE = (
    b"GET /chat?room=1 HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


async def test_websocket_through_the_proxy(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    up = await upstream_factory("stable", handler=echo)
    app = await proxy_factory(config_text(up.url, up.url))
    big = os.urandom(2 * 1024 * 1024)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port_of(app)}/ws", max_msg_size=0) as ws,
    ):
        assert ws.get_extra_info("peername") is not None
        for i in range(20):
            await ws.send_str(f"hello {i}")
            assert await ws.receive_str(timeout=5) == f"echo:hello {i}"
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=10) == big[::-1]
        await ws.close()
    assert up.seen[0]["headers"]["Upgrade"] == "websocket"
    plane = app.plane
    assert plane is not None
    await wait_until(lambda: plane.tunnels == set(), what="the tunnel to be closed on both sides")


async def test_raw_tunnel_is_byte_for_byte(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    seen: list[RawMessage] = []
    payload = bytes(range(256)) * 8192  # 2 MiB, every byte value

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        # The 101 and the first tunneled bytes in one write.
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x00\xffupstream-first\r\n\r\n"
        )
        early = await reader.readexactly(len(b"client-early\x00\r\n"))
        writer.write(b"got:" + early)
        data = await reader.readexactly(len(payload))
        writer.write(data[::-1])
        await writer.drain()
        await reader.read()  # until the client side closes

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(UPGRADE + b"client-early\x00\r\n")  # bytes right after the request, before the 101
    start, headers, _ = await asyncio.wait_for(read_head(client.reader), 5)
    assert start == b"HTTP/1.1 101 Switching Protocols"
    names = [n.lower() for n, _ in headers]
    assert (b"Upgrade", b"websocket") in headers and b"connection" in names
    assert (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in headers
    first = b"\x00\xffupstream-first\r\n\r\n"
    assert await client.reader.readexactly(len(first)) == first
    assert await client.reader.readexactly(4 + 15) == b"got:client-early\x00\r\n"
    await client.send(payload)
    got = await asyncio.wait_for(client.reader.readexactly(len(payload)), 10)
    assert got == payload[::-1]
    client.close()
    req = seen[0]
    assert req.start == b"GET /chat?room=1 HTTP/1.1"
    assert req.get("connection") == [b"upgrade"] and req.get("upgrade") == [b"websocket"]
    assert req.get("sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]


async def test_tunnel_closes_when_upstream_closes(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nbye")
        await writer.drain()
        writer.close()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(UPGRADE)
    await read_head(client.reader)
    assert await client.at_eof() == b"bye"
    client.close()


async def test_tunnel_closes_upstream_when_client_closes(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    upstream_done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        try:
            assert await reader.readexactly(4) == b"ping"
            await reader.read()
        finally:
            upstream_done.set()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(UPGRADE)
    await read_head(client.reader)
    await client.send(b"ping")
    client.close()
    await asyncio.wait_for(upstream_done.wait(), 1)


async def test_upgrade_refused_by_upstream(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: other\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(UPGRADE + b"tunnel-bytes")
    resp = await client.response()
    rest = await client.at_eof()
    client.close()
    assert resp.status == 426 and resp.body == b"nope"
    assert resp.get("upgrade") == []  # hop-by-hop outside a 101
    assert rest == b""  # what followed the request was not parsed as another request


async def test_upgrade_header_without_connection_token_is_plain_request(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    seen: list[RawMessage] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n")
    assert resp.status == 200
    assert (await client.request(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    client.close()
    assert seen[0].get("upgrade") == [] and seen[0].get("connection") == []
