"""HTTP/2 towards clients, with real clients: curl (--http2-prior-knowledge), nghttp, h2load and
httpx (http2=True; with http1=False it uses prior knowledge over cleartext) against the real proxy;
streams take the same route, split, stickiness, metrics and access log as HTTP/1.1 requests."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import Upstream, config_text, wait_until
from support.certs import CA
from support.h2raw import RawH2

from proxy.control.app import ProxyApp
from proxy.routing.router import BUCKETS, sticky_bucket

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]
CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
H2LOAD = shutil.which("h2load")


async def run(*argv: str, timeout: float = 60.0) -> str:
    """Run a client program without blocking the loop the proxy and upstreams run on."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def port(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


@pytest.fixture
async def pair(upstream_factory: StartUpstream) -> tuple[Upstream, Upstream]:
    return await upstream_factory("stable"), await upstream_factory("canary")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_prior_knowledge_get_and_post(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    stable, canary = pair
    app = await proxy_factory(config_text(stable.url, canary.url))
    base = f"http://127.0.0.1:{port(app)}"
    fmt = "\n%{http_version} %{http_code}"
    out = await run(str(CURL), "-sS", "--http2-prior-knowledge", "-w", fmt, f"{base}/a?q=1")
    assert out == "stable GET /a?q=1 0\n\n2 200"
    out = await run(
        str(CURL), "-sS", "--http2-prior-knowledge", "-d", "hello world", "-w", "\n%{http_version}", f"{base}/post"
    )
    assert out == "stable POST /post 11\n\n2"
    seen = stable.seen[-1]
    assert seen["headers"]["Host"] == f"127.0.0.1:{port(app)}"  # :authority became Host
    assert seen["headers"]["Content-Length"] == "11"
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    # HTTP/1.1 on the same listener is untouched.
    out = await run(str(CURL), "-sS", "--http1.1", "-w", " %{http_version}", f"{base}/one")
    assert out == "stable GET /one 0\n 1.1"


@pytest.mark.skipif(NGHTTP is None, reason="nghttp (nghttp2-client) not installed")
async def test_several_urls_on_one_connection(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    # curl 7.88 (Debian 12) drops the second transfer of a reused prior-knowledge connection, against
    # nginx too; nghttp sends all URLs over one connection.
    stable, canary = pair
    app = await proxy_factory(config_text(stable.url, canary.url))
    base = f"http://127.0.0.1:{port(app)}"
    out = await run(str(NGHTTP), "-n", "-s", f"{base}/one", f"{base}/two", f"{base}/three")
    assert len(re.findall(r"\n\s+\d+\s+\S+\s+\S+\s+200\s", "\n" + out)) == 3 or out.count(" 200 ") == 3, out
    assert sorted(s["path"] for s in stable.seen) == ["/one", "/three", "/two"]


async def test_httpx_many_concurrent_streams_on_one_connection(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    stable, canary = pair
    app = await proxy_factory(config_text(stable.url, canary.url))
    assert app.plane is not None
    limits = httpx.Limits(max_connections=1)
    base = f"http://127.0.0.1:{port(app)}"
    async with httpx.AsyncClient(http1=False, http2=True, limits=limits, base_url=base) as client:
        first = await client.get("/warm")
        assert first.http_version == "HTTP/2" and first.status_code == 200
        n = 300  # more than the 100 concurrent streams allowed: the client queues the rest
        results = await asyncio.gather(*(client.post(f"/r/{i}", content=b"x" * i) for i in range(n)))
        assert [r.status_code for r in results] == [200] * n
        assert [r.text for r in results] == [f"stable POST /r/{i} {i}\n" for i in range(n)]
        assert {r.http_version for r in results} == {"HTTP/2"}
        assert len(app.plane.clients) == 1  # one client connection carried every stream
    await wait_until(lambda: app.plane is not None and not app.plane.clients, what="the connection to close")
    assert app.plane.stats.in_flight == 0


async def test_header_routing_and_cookie_crumbs(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    stable, canary = pair
    app = await proxy_factory(config_text(stable.url, canary.url))
    client = await RawH2.open(port(app))
    try:
        status, headers, body = await client.get("/a", x_canary="always")
        assert (status, body) == (200, b"canary GET /a 0\n")
        assert headers[b"x-upstream"] == b"canary" and headers[b"via"] == b"1.1 " + app.plane.via
        assert headers[b"x-request-id"]
        status, _, body = await client.get("/b", x_canary="nope")
        assert (status, body) == (200, b"stable GET /b 0\n")
        # Cookie crumbs (RFC 9113 8.2.3) reach the HTTP/1.1 upstream as one Cookie header.
        sid = client.conn.get_next_available_stream_id()
        hdrs = [(b":method", b"GET"), (b":path", b"/c"), (b":scheme", b"http"), (b":authority", b"shop.test")]
        hdrs += [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
        client.conn.send_headers(sid, hdrs, end_stream=True)
        client.flush()
        await client.pump(lambda c: c.ended(sid))
        assert client.response(sid)[0] == 200
        seen = stable.seen[-1]["headers"]
        assert seen.getall("Cookie") == ["a=1; b=2"]
        assert seen["Host"] == "shop.test"
    finally:
        client.close()


async def test_sticky_split_over_http2(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    stable, canary = pair
    routes = "  - name: web\n    split: {stable: 50, canary: 50}\n    sticky: {cookie: cp_id, issue: {max_age: 1h}}\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    sides = set()
    for _ in range(12):
        async with httpx.AsyncClient(http1=False, http2=True, base_url=f"http://127.0.0.1:{port(app)}") as browser:
            first = await browser.get("/")
            assert first.http_version == "HTTP/2" and first.status_code == 200
            value = browser.cookies.get("cp_id")
            assert value, first.headers
            side = "canary" if sticky_bucket(value.encode()) >= BUCKETS // 2 else "stable"
            assert first.headers["x-upstream"] == side
            for _ in range(10):
                r = await browser.get("/page")
                assert r.headers["x-upstream"] == side and "set-cookie" not in r.headers
            sides.add(side)
    assert sides == {"stable", "canary"}  # 12 visitors at 50%: both sides (fails with p = 2^-11)


async def test_own_errors_carry_the_http1_headers(proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]) -> None:
    stable, _ = pair
    routes = "  - name: api\n    match: {path_prefix: /api}\n    to: canary\n"
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    extra = "limits: {max_body_size: 1kb}\n"
    app = await proxy_factory(config_text(stable.url, dead, extra, routes=routes))
    client = await RawH2.open(port(app))
    try:
        status, headers, body = await client.get("/nothing")
        assert status == 404 and body == b"404 Not Found\n"
        assert headers[b"date"] and headers[b"x-request-id"] and headers[b"via"] == b"1.1 " + app.plane.via
        assert headers[b"content-length"] == b"14"
        status, headers, body = await client.get("/api/x")
        assert status == 502 and body == b"502 Bad Gateway\n" and headers[b"x-request-id"]
    finally:
        client.close()
    async with httpx.AsyncClient(http1=False, http2=True, base_url=f"http://127.0.0.1:{port(app)}") as c:
        r = await c.post("/api/upload", content=b"x" * 5000)
        assert r.status_code == 413 and r.http_version == "HTTP/2"


async def test_same_access_log_and_metrics_as_http1(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream], tmp_path: Path
) -> None:
    stable, canary = pair
    log_path = tmp_path / "access.log"
    text = config_text(stable.url, canary.url).replace("access_log: false", f"access_log: {{path: {log_path}}}")
    app = await proxy_factory(text)
    base = f"http://127.0.0.1:{port(app)}"
    async with httpx.AsyncClient(http2=False) as h1, httpx.AsyncClient(http1=False, http2=True) as h2:
        r1 = await h1.get(f"{base}/same?x=1", headers={"x-canary": "always"})
        r2 = await h2.get(f"{base}/same?x=1", headers={"x-canary": "always"})
        assert (r1.http_version, r2.http_version) == ("HTTP/1.1", "HTTP/2")
        assert r1.text == r2.text

    def lines() -> list[dict[str, object]]:
        if not log_path.exists():
            return []
        return [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]

    entries = await wait_until(lambda: len(lines()) >= 2 and lines(), what="two access log lines")
    keys = ("method", "path", "status", "route", "upstream", "bytes", "client")
    assert [{k: e[k] for k in keys} for e in entries] == [
        {"method": "GET", "path": "/same", "status": 200, "route": "beta", "upstream": "canary", "bytes": 23,
         "client": "127.0.0.1"}
    ] * 2  # fmt: skip
    assert entries[1]["request_id"] == r2.headers["x-request-id"]
    counts = app.stats.route_counts_for("beta", "canary")
    assert counts.by_class[2] == 2


async def test_tls_listener_negotiates_h2_by_alpn(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream], tmp_path: Path
) -> None:
    stable, canary = pair
    ca = CA(tmp_path / "pki")
    server = ca.issue("localhost", dns=["localhost"])
    text = config_text(stable.url, canary.url) + f"tls:\n  cert: {server.cert}\n  key: {server.key}\n"
    app = await proxy_factory(text)
    p = port(app)
    out = await run(
        str(CURL), "-sS", "--http2", "--cacert", str(ca.cert), "--resolve", f"localhost:{p}:127.0.0.1",
        "-H", "x-canary: always", "-w", "%{http_version}", f"https://localhost:{p}/tls",
    )  # fmt: skip
    assert out == "canary GET /tls 0\n2"
    assert canary.seen[-1]["headers"]["X-Forwarded-Proto"] == "https"
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    async with httpx.AsyncClient(http2=True, verify=ctx) as c:
        r = await c.get(f"https://localhost:{p}/x")
        assert (r.status_code, r.http_version, r.text) == (200, "HTTP/2", "stable GET /x 0\n")
    async with httpx.AsyncClient(http2=False, verify=ctx) as c:  # ALPN http/1.1: the HTTP/1.1 leg
        r = await c.get(f"https://localhost:{p}/y")
        assert (r.status_code, r.http_version) == (200, "HTTP/1.1")


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) not installed")
async def test_h2load_several_streams_per_connection_all_2xx(
    proxy_factory: StartProxy, pair: tuple[Upstream, Upstream]
) -> None:
    stable, canary = pair
    app = await proxy_factory(config_text(stable.url, canary.url))
    out = await run(str(H2LOAD), "-n", "2000", "-c", "4", "-m", "16", f"http://127.0.0.1:{port(app)}/load")
    assert "2000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx" in out, out


async def test_upgrade_h2c_from_http1_is_not_supported(
    proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    async def show(request: web.Request) -> web.StreamResponse:
        return web.Response(text=f"upgrade={request.headers.get('Upgrade')}")

    up = await upstream_factory("stable", show)
    app = await proxy_factory(config_text(up.url, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", port(app))
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head  # answered as HTTP/1.1, never 101


async def test_trailers_both_ways(proxy_factory: StartProxy, raw_upstream: Callable[..., Awaitable[Any]]) -> None:
    """Request trailers reach a chunked upstream request; chunked response trailers become a
    trailing HEADERS frame; hop-by-hop fields never travel."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"\r\n\r\n")  # chunks, the last chunk and the trailer section
        seen.append(head + body)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\nConnection: keep-alive\r\n\r\n"
            b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawH2.open(port(app))
    try:
        hdrs = [(b":method", b"POST"), (b":path", b"/t"), (b":scheme", b"http"), (b":authority", b"x")]
        client.conn.send_headers(1, [*hdrs, (b"te", b"trailers")])
        client.conn.send_data(1, b"abc")
        client.conn.send_headers(1, [(b"x-checksum", b"42")], end_stream=True)
        client.flush()
        await client.pump(lambda c: c.ended(1))
        status, headers, body = client.response(1)
        assert (status, body) == (200, b"hello")
        assert b"connection" not in headers and b"transfer-encoding" not in headers
        trailers = [e for e in client.events if type(e).__name__ == "TrailersReceived"]
        assert [dict(t.headers) for t in trailers] == [{b"grpc-status": b"0", b"grpc-message": b"fine"}]  # type: ignore[attr-defined]
    finally:
        client.close()
    (raw,) = seen
    assert b"Transfer-Encoding: chunked\r\n" in raw and b"\r\n3\r\nabc\r\n" in raw
    assert raw.endswith(b"0\r\nx-checksum: 42\r\n\r\n")
    assert b"\r\nte:" not in raw.lower()  # hop-by-hop towards an HTTP/1.1 upstream
