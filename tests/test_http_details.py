"""Issue 15: HTTP details real clients hit (curl --http2, raw sockets after a declined upgrade,
own responses with ids and Date, whitespace, Via, Host syntax, normalised paths, HTTP/0.9)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import (
    RawClient,
    RawMessage,
    RawUpstream,
    Upstream,
    config_text,
    free_port,
    holds,
    read_request,
    wait_running,
    wait_until,
)

from proxy.control.app import ProxyApp

ProxyFactory = Callable[..., Awaitable[ProxyApp]]
RawFactory = Callable[..., Awaitable[RawUpstream]]
UpFactory = Callable[..., Awaitable[Upstream]]

WS_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def port_of(app: ProxyApp) -> int:
    assert app.plane is not None
    return app.plane.bound_port


async def echo_body(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.Response(body=b"got:" + body)


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=timeout)


# -- 1. Upgrade + body, h2c ----------------------------------------------------------------------


async def test_curl_http2_with_a_body_is_answered_at_once(
    upstream_factory: UpFactory, proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable", handler=echo_body)
    app = await proxy_factory(config_text(up.url, up.url))
    url = f"http://127.0.0.1:{port_of(app)}/echo"
    t0 = time.monotonic()
    out = await asyncio.to_thread(curl, "--http2", "-d", "a=1", url)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout == "got:a=1" and took < 5, (out.stdout, took)
    headers = up.seen[0]["headers"]
    assert "Upgrade" not in headers and "HTTP2-Settings" not in headers  # h2c is never forwarded
    assert "upgrade" not in headers.get("Connection", "").lower()


def test_curl_http2_with_a_body_to_http_server(proxy_process: Any) -> None:
    """The issue's own case against a stock `http.server` upstream (which ignores Upgrade), with the
    proxy as a real process: answered at once, no 504, `Upgrade: h2c` not forwarded."""
    seen: list[dict[str, str]] = []

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            seen.append(dict(self.headers))
            body = b"got:" + self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proxy = proxy_process(config_text(url, url))
        t0 = time.monotonic()
        out = curl("--http2", "-d", "a=1", "-w", " %{http_code}", f"http://127.0.0.1:{proxy.port}/echo")
        took = time.monotonic() - t0
    finally:
        server.shutdown()
        thread.join(10)
    assert out.returncode == 0 and out.stdout == "got:a=1 200" and took < 5, (out, took)
    assert "Upgrade" not in seen[0] and "HTTP2-Settings" not in seen[0], seen


async def test_curl_http2_reuses_one_connection(upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    app = await proxy_factory(config_text(up.url, up.url))
    base = f"http://127.0.0.1:{port_of(app)}"
    out = await asyncio.to_thread(
        curl, "--http2", "-w", "%{num_connects}\\n", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
        f"{base}/1", f"{base}/2", f"{base}/3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [int(n) for n in out.stdout.split()] == [1, 0, 0]  # the same connection for all three


async def test_h2c_only_upgrade_is_a_plain_request(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    seen: list[RawMessage] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    await client.send(
        b"POST /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    first, second = await client.response(), await client.response()
    client.close()
    assert first.status == second.status == 200
    assert [m.start for m in seen] == [b"POST /a HTTP/1.1", b"GET /b HTTP/1.1"]
    assert seen[0].body == b"hello" and seen[0].get("upgrade") == [] and seen[0].get("http2-settings") == []


async def test_upgrade_body_streams_before_any_101(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    """A WebSocket-style upgrade with a body: the upstream gets the body without answering first."""
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)  # blocks until the body is there
        bodies.append(req.body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(WS_HANDSHAKE[:-2] + b"Content-Length: 3\r\n\r\nabc")
    client.close()
    assert resp.status == 200 and bodies == [b"abc"]


@pytest.mark.parametrize("split", [False, True])
async def test_chunked_upgrade_body_keeps_the_connection(
    split: bool, raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    """A chunked body (with a trailer, and lines that look like HTTP) on an Upgrade request the
    upstream declines: like nginx, the connection goes on with the client's next request."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            body = b"%s:%s" % (req.start.split()[1], req.body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    head = WS_HANDSHAKE[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"4\r\nab\r\n\r\n11\r\nGET /x HTTP/1.1\r\n\r\n0\r\nX-Sum: 1\r\n\r\n"
    if split:  # the final chunk arrives in pieces
        await client.send(head + body[:-9])
        await wait_until(lambda: up.accepted == 1, what="the head forwarded")
        resp = await client.request(body[-9:])
    else:
        resp = await client.request(head + body)
    assert resp.status == 200 and resp.body == b"/ws:ab\r\nGET /x HTTP/1.1\r\n", resp.raw
    assert resp.get("connection") == []
    again = await client.request(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert again.status == 200 and again.body == b"/next:"


# -- 2. Declined upgrade -------------------------------------------------------------------------


async def test_connection_usable_after_a_declined_upgrade(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            body = b"declined" if req.get("upgrade") else b"posted:" + req.body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    first = await client.request(WS_HANDSHAKE)
    assert first.status == 200 and first.body == b"declined" and first.get("connection") == []
    second = await client.request(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    client.close()
    assert second.status == 200 and second.body == b"posted:hi"


async def test_declined_upgrade_keeps_upstream_close(raw_upstream: RawFactory, proxy_factory: ProxyFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(WS_HANDSHAKE)
    assert resp.status == 403 and resp.get("connection") == [b"close"]
    assert await client.at_eof() == b""
    client.close()


# -- 3. Own responses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "status"),
    [("no-route", 404), ("refused", 502), ("too-large", 413), ("bad", 400), ("loop", 508), ("slow", 504)],
)
async def test_own_responses_carry_request_id_and_date(
    case: str, status: int, upstream_factory: UpFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def never_answers(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")

    up = await upstream_factory("stable", handler=never_answers if case == "slow" else None)
    target = f"http://127.0.0.1:{free_port()}" if case == "refused" else up.url
    routes = "  - name: only\n    match: {path_prefix: /app}\n    to: stable\n"
    log = tmp_path / "access.log"
    extra = "limits: {max_body_size: 10}\nretries: {attempts: 0}\ntimeouts: {response: 1s}\n"
    text = config_text(target, target, routes=routes, extra=extra)
    app = await proxy_factory(text.replace("access_log: false", f"access_log: {{path: {log}}}"))
    path = b"/nothing" if case == "no-route" else b"/app"
    extra = {"too-large": b"Content-Length: 100\r\n", "bad": b"Content-Length: 1\r\nContent-Length: 2\r\n",
             "loop": b"Via: 1.1 %s\r\n" % app.plane.via}.get(case, b"")  # fmt: skip
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET %s HTTP/1.1\r\nHost: h\r\nX-Request-Id: my-id-1\r\n%s\r\n" % (path, extra))
    client.close()
    assert resp.status == status, resp.raw
    rid = b"my-id-1" if case != "bad" else resp.one("x-request-id")  # 400: the id may come after the fault
    assert rid and resp.one("x-request-id") == rid
    date = resp.one("date")
    assert date is not None and date.endswith(b" GMT")
    entries = await wait_until(lambda: log.exists() and log.read_text().splitlines(), what="access log line")
    entry = json.loads(entries[-1])
    assert entry["status"] == status and entry["bytes"] == len(resp.body) > 0
    assert entry["request_id"] == rid.decode()
    release.set()


async def test_101_bytes_are_logged_when_the_tunnel_ends(
    raw_upstream: RawFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        writer.write(b"x" * 1000)
        await writer.drain()
        await reader.read()

    up = await raw_upstream(handler)
    log = tmp_path / "access.log"
    text = config_text(up.url, up.url).replace("access_log: false", f"access_log: {{path: {log}}}")
    app = await proxy_factory(text)
    client = await RawClient.connect(port_of(app))
    await client.send(WS_HANDSHAKE)
    await client.reader.readuntil(b"\r\n\r\n")
    assert await client.reader.readexactly(1000) == b"x" * 1000
    client.close()
    lines = await wait_until(lambda: log.exists() and log.read_text().splitlines(), what="access log line")
    entry = json.loads(lines[-1])
    assert entry["status"] == 101 and entry["bytes"] == 1000


# -- 4. Whitespace around values -----------------------------------------------------------------


async def test_trailing_whitespace_is_not_part_of_a_value(
    upstream_factory: UpFactory, proxy_factory: ProxyFactory
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    routes = (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 50, canary: 50}\n    sticky: {header: x-user-id}\n"
    )
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Canary: always \t\r\nX-Other: v  \r\n\r\n")
    assert resp.body.startswith(b"canary")
    assert canary.seen[-1]["headers"]["X-Other"] == "v"  # forwarded without it too
    for user in range(20):
        plain = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id: u%d\r\n\r\n" % user)
        spaced = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-User-Id:  u%d  \r\n\r\n" % user)
        assert plain.body.split()[0] == spaced.body.split()[0], user
    client.close()


# -- 5. Via --------------------------------------------------------------------------------------


async def test_two_proxies_in_a_row_with_their_own_pseudonyms(
    upstream_factory: UpFactory, proxy_factory: ProxyFactory
) -> None:
    up = await upstream_factory("stable")
    sidecar = await proxy_factory(config_text(up.url, up.url, extra="via: sidecar\n"), name="sidecar.yaml")
    mid = f"http://127.0.0.1:{port_of(sidecar)}"
    edge = await proxy_factory(config_text(mid, mid, extra="via: edge\n"), name="edge.yaml")
    client = await RawClient.connect(port_of(edge))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    client.close()
    assert resp.status == 200
    assert up.seen[0]["headers"].getall("Via") == ["1.1 edge, 1.1 sidecar"] or up.seen[0]["headers"].getall("Via") == [
        "1.1 edge",
        "1.1 sidecar",
    ]
    assert resp.get("via") == [b"1.1 sidecar", b"1.1 edge"]


async def test_via_off(upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    app = await proxy_factory(config_text(up.url, up.url, extra='via: ""\n'))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.1 canary-proxy\r\n\r\n")
    missing = await client.request(b"GET /nope HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n")
    client.close()
    assert resp.status == 200 and resp.get("via") == []
    assert up.seen[0]["headers"].getall("Via") == ["1.1 canary-proxy"]  # passed on, not ours, not a loop
    assert missing.status == 400 and missing.get("via") == []


# -- 11. Host syntax, normalised paths, HTTP/0.9 -------------------------------------------------


@pytest.mark.parametrize("host", [b"evil.com:80@x", b"a b", b"h/x", b"h:80:90", b"[::1"])
async def test_invalid_host_is_400(host: bytes, upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    client.close()
    assert resp.status == 400 and up.seen == []


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"[::1]:80", b"10.0.0.1", b"a_b.local"])
async def test_valid_hosts_pass(host: bytes, upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    client.close()
    assert resp.status == 200


@pytest.mark.parametrize(
    ("path", "route"),
    [(b"/beta/%2e%2e/admin", b"stable"), (b"/beta/../admin", b"stable"), (b"/%62eta/x", b"canary"),
     (b"/beta/./x", b"canary"), (b"/x/../beta/y", b"canary"), (b"/beta%2Fx", b"stable")],
)  # fmt: skip
async def test_path_prefix_matches_the_normalised_path(
    path: bytes, route: bytes, upstream_factory: UpFactory, proxy_factory: ProxyFactory
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    routes = "  - name: beta\n    match: {path_prefix: /beta/}\n    to: canary\n  - name: rest\n    to: stable\n"
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    client = await RawClient.connect(port_of(app))
    resp = await client.request(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
    client.close()
    assert resp.body.split()[0] == route


@pytest.mark.parametrize("line", [b"GET /\r\n", b"GET /index.html\n", b"GET /\r\n\r\n"])
async def test_http09_is_refused_at_once(line: bytes, upstream_factory: UpFactory, proxy_factory: ProxyFactory) -> None:
    up = await upstream_factory("stable")
    app = await proxy_factory(config_text(up.url, up.url))
    client = await RawClient.connect(port_of(app))
    t0 = time.monotonic()
    resp = await client.request(line, timeout=3)
    client.close()
    assert resp.status == 400 and time.monotonic() - t0 < 1 and up.seen == []


# -- 11. Log lines: once per instance, rollout events as JSON lines ------------------------------


async def test_workers_log_once_and_events_are_json_lines(upstream_factory: UpFactory, proxy_process: Any) -> None:
    up = await upstream_factory("stable")
    pp = proxy_process(config_text(up.url, up.url), args=("--workers", "2"))
    await asyncio.to_thread(wait_running, pp)
    await wait_until(lambda: sum("listening on" in ln for ln in pp.lines) >= 1, what="listening")
    pp.config.write_text(pp.config.read_text() + "# changed\n")
    os.kill(pp.proc.pid, signal.SIGHUP)
    await wait_until(lambda: any('"event": "reload"' in ln for ln in pp.lines), timeout=10, what="reload event")
    await wait_until(lambda: "config reloaded" in "".join(pp.lines), timeout=10, what="config reloaded")

    def once() -> bool:
        text = "".join(pp.lines)
        return text.count("listening on") == 1 and text.count("config reloaded") == 1

    await holds(once, 1.0, "one listening and one config reloaded line")  # the other worker's would come
    events = [ln for ln in pp.lines if '"event"' in ln]
    for line in events:
        record = json.loads(line)  # the whole line is one JSON object
        assert record["logger"] == "canary_proxy.rollout"
