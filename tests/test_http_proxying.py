"""Pass-through: methods, targets, header order and repeats, hop-by-hop removal, forwarding headers,
keep-alive and upstream connection pooling, access log. Everything over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import RawClient, RawMessage, RawUpstream, Upstream, config_text, read_request

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


async def recording_upstream(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], response: bytes
) -> tuple[RawUpstream, list[RawMessage]]:
    """A keep-alive raw upstream that records each request and answers `response` to every one."""
    seen: list[RawMessage] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(response)
            await writer.drain()

    return await raw_upstream(handler), seen


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "MKCOL"])
async def test_methods_pass_through(
    method: str, upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    client = await RawClient.connect(port_of(app))
    body = b"" if method in ("GET", "OPTIONS") else b"payload"
    resp = await client.request(
        f"{method} /m?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    client.close()
    assert resp.status == 200
    assert resp.body == f"stable {method} /m?q=1 {len(body)}\n".encode()
    assert [s["method"] for s in stable.seen] == [method]


async def test_raw_target_is_forwarded_byte_for_byte(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    targets = [b"/a%2Fb/../c?x=1&x=2", b"/%7Euser/./x//y;p=1?a=%20&&b", b"/?", b"/caf%C3%A9#frag"]
    for target in targets:
        resp = await client.request(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert resp.status == 200
    client.close()
    assert [m.start for m in seen] == [b"GET " + t + b" HTTP/1.1" for t in targets]


async def test_header_order_and_repeats_kept_both_ways(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX-Resp: one\r\nSet-Cookie: b=2\r\n"
        b"X-Resp: two\r\nset-cookie: c=3; HttpOnly\r\nContent-Length: 2\r\n\r\nok"
    )
    up, seen = await recording_upstream(raw_upstream, response)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(
        b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\nX-Rep: 1\r\nCookie: k=v\r\nX-Rep: 2\r\n"
        b"x-rep: 3\r\nAccept: b\r\n\r\n"
    )
    client.close()
    assert resp.get("set-cookie") == [b"a=1; Path=/", b"b=2", b"c=3; HttpOnly"]
    assert resp.get("x-resp") == [b"one", b"two"]
    assert resp.body == b"ok"
    req = seen[0]
    # The client's headers come first, in the client's order, each repeat on its own line.
    assert req.headers[:7] == [
        (b"Host", b"h"), (b"Accept", b"a"), (b"X-Rep", b"1"), (b"Cookie", b"k=v"),
        (b"X-Rep", b"2"), (b"x-rep", b"3"), (b"Accept", b"b"),
    ]  # fmt: skip


async def test_hop_by_hop_request_headers_removed(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret, x-other\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
        b"Upgrade: h2c\r\nX-Secret: s\r\nX-Other: o\r\nX-Kept: k\r\n\r\n"
    )
    assert resp.status == 200
    # Connection: keep-alive was honoured: the same connection serves another request.
    assert (await client.request(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
    client.close()
    names = seen[0].names()
    for hop in (b"connection", b"keep-alive", b"te", b"trailer", b"proxy-connection", b"proxy-authorization"):
        assert hop not in names
    assert b"upgrade" not in names
    assert b"x-secret" not in names and b"x-other" not in names
    assert seen[0].get("x-kept") == [b"k"]


async def test_hop_by_hop_response_headers_removed(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Internal: secret\r\nTrailer: X-T\r\n"
        b"X-Public: yes\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: t\r\n\r\n"
    )
    up, _ = await recording_upstream(raw_upstream, response)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    names = resp.names()
    for hop in (b"keep-alive", b"proxy-connection", b"upgrade", b"x-internal", b"connection"):
        assert hop not in names, resp.raw
    # `Trailer` is not hop-by-hop in RFC 9110: relayed with its trailers (both legs chunked).
    assert resp.get("trailer") == [b"X-T"] and resp.raw.endswith(b"0\r\nX-T: t\r\n\r\n")
    assert resp.get("x-public") == [b"yes"]
    assert resp.get("transfer-encoding") == [b"chunked"]  # re-framed by the proxy itself
    assert resp.body == b"ok"


async def test_forwarding_headers_added(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    r1 = await client.request(b"GET / HTTP/1.1\r\nHost: example.test:8080\r\n\r\n")
    r2 = await client.request(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\nX-Request-Id: abc-123\r\nVia: 1.1 edge\r\n\r\n"
    )
    client.close()
    first, second = seen
    assert first.get("x-forwarded-for") == [b"127.0.0.1"]
    assert first.get("x-forwarded-proto") == [b"http"]
    assert first.get("x-forwarded-host") == [b"example.test:8080"]
    ours = b"1.1 " + app.plane.via  # this instance's own pseudonym (canary-proxy-XXXXXX)
    assert app.plane.via.startswith(b"canary-proxy-") and first.get("via") == [ours]
    generated = first.one("x-request-id")
    assert generated
    assert r1.get("x-request-id") == [generated]  # the client learns the id too
    assert r1.get("via") == [ours]
    # Appended to what the client sent; untrusted client: its proto/host claims are replaced.
    assert second.get("x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    assert second.get("x-forwarded-proto") == [b"http"]
    assert second.get("x-forwarded-host") == [b"h"]
    assert second.get("x-request-id") == [b"abc-123"]
    assert r2.get("x-request-id") == [b"abc-123"]
    assert second.get("via") == [b"1.1 edge", ours]
    assert second.one("x-request-id") != generated


async def test_trusted_proxy_keeps_forwarded_proto_and_host(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url, extra="trusted_proxies: [127.0.0.0/8]\n"))
    client = await RawClient.connect(port_of(app))
    await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: pub\r\n\r\n")
    client.close()
    assert seen[0].get("x-forwarded-proto") == [b"https"]
    assert seen[0].get("x-forwarded-host") == [b"pub"]


async def test_connection_header_cannot_strip_our_forwarding_headers(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Forwarded-For, Via, X-Request-Id, "
        b"X-Forwarded-Proto, X-Forwarded-Host, Host\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n"
    )
    assert resp.status == 200
    assert resp.get("connection") == [b"close"]
    assert await client.at_eof() == b""  # close was honoured
    client.close()
    req = seen[0]
    assert req.get("host") == [b"h"]
    assert req.get("x-forwarded-for") == [b"10.1.1.1, 127.0.0.1"]
    assert req.get("x-forwarded-proto") == [b"http"]
    assert req.get("x-forwarded-host") == [b"h"]
    assert req.get("via") == [b"1.1 " + app.plane.via]
    assert req.one("x-request-id")


async def test_upstream_request_id_is_not_duplicated(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, _ = await recording_upstream(
        raw_upstream, b"HTTP/1.1 200 OK\r\nX-Request-Id: up-1\r\nContent-Length: 0\r\n\r\n"
    )
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: mine\r\n\r\n")
    client.close()
    assert resp.get("x-request-id") == [b"up-1"]


async def test_keep_alive_reuses_one_upstream_connection(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    client = await RawClient.connect(port_of(app))
    for i in range(100):
        resp = await client.request(f"GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert resp.status == 200 and resp.body == f"stable GET /{i} 0\n".encode()
        assert resp.one("connection") is None  # HTTP/1.1 keep-alive is the default: nothing to say
    client.close()
    assert app.plane is not None
    pools = app.plane.pools.pools
    assert [p.connects for p in pools.values()] == [1]
    assert len(stable.seen) == 100


async def test_raw_upstream_sees_one_connection_for_many_clients_in_turn(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], proxy_factory: ProxyFactory
) -> None:
    up, seen = await recording_upstream(raw_upstream, OK)
    app = await proxy_factory(config_text(up.url, up.url))
    for i in range(20):  # a new client connection each time; the upstream side stays pooled
        client = await RawClient.connect(port_of(app))
        resp = await client.request(f"GET /{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
        assert resp.status == 200
        assert await client.at_eof() == b""
        client.close()
    assert up.accepted == 1
    assert len(seen) == 20


async def test_http10_client_keep_alive_and_close(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert resp.status == 200 and resp.get("connection") == [b"keep-alive"]
    assert resp.body == b"stable GET /a 0\n"
    resp = await client.request(b"GET /b HTTP/1.0\r\n\r\n")
    assert resp.body == b"stable GET /b 0\n"
    assert await client.at_eof() == b""  # HTTP/1.0 without keep-alive: closed after the response
    client.close()


async def test_access_log_lines_are_json_with_documented_fields(
    upstream_factory: Callable[..., Awaitable[Upstream]], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    stable = await upstream_factory("stable")

    async def missing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="nope")

    canary = await upstream_factory("canary", handler=missing)
    log_path = tmp_path / "access.log"
    text = config_text(stable.url, canary.url).replace(
        "access_log: false", f"access_log: {{enabled: true, path: {log_path}}}"
    )
    app = await proxy_factory(text)
    client = await RawClient.connect(port_of(app))
    await client.request(b'GET /p/caf%C3%A9?q="1" HTTP/1.1\r\nHost: h\r\nX-Request-Id: rid-1\r\n\r\n')
    await client.request(b"POST /c HTTP/1.1\r\nHost: h\r\nx-canary: always\r\nContent-Length: 3\r\n\r\nabc")
    client.close()
    assert app.plane is not None and app.plane.access_log is not None
    app.plane.access_log.flush()
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2
    entries = [json.loads(line) for line in lines]
    fields = {"time", "method", "path", "status", "route", "upstream", "duration_ms", "bytes", "request_id", "client"}
    for e in entries:
        assert set(e) >= fields
        assert isinstance(e["time"], float) and isinstance(e["duration_ms"], float)
        assert e["client"] == "127.0.0.1"
    first, second = entries
    assert (first["method"], first["path"], first["status"]) == ("GET", "/p/caf%C3%A9", 200)
    assert (first["route"], first["upstream"], first["request_id"]) == ("default", "stable", "rid-1")
    assert first["bytes"] == len(b'stable GET /p/caf%C3%A9?q="1" 0\n')
    assert (second["method"], second["path"], second["status"]) == ("POST", "/c", 404)
    assert (second["route"], second["upstream"], second["bytes"]) == ("beta", "canary", 4)
    assert second["request_id"]
